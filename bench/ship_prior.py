"""Make a trained candidate prior the shipped built-in prior (issue 22, item 3).

Copies the candidate's weights into ``deqir_dist/models/weights/`` and writes the shipped card from
the candidate's own card (written by ``deqir train-prior``) with:

- ``sampler``: the settings section given by ``--sampler`` (a JSON file holding the section: the
  steps, etw, nw and clip_x0 chosen on the settings scan, and why), checked as restore() checks it;
- ``data``: the source package and licence of every photograph that came from a ``--data`` folder,
  read from its manifest.json (older candidates' cards only name scikit-image);
- ``lineage``: the chain of runs that made these weights (``--lineage``: a JSON list of the earlier
  runs, each {"weights_sha256", "command", "wall_minutes", "steps"}; this run is appended from its card);
- ``round``: status "shipped".

    python bench/ship_prior.py --candidate bench/results/prior-round1/builtin.safetensors \\
        --sampler bench/results/prior-round1/sampler.json --data /work/prior-data \\
        --lineage bench/results/prior-round1/lineage.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deqir_dist.apps.train_prior import _data_provenance, card_summary  # noqa: E402
from deqir_dist.io.jsonio import write_json  # noqa: E402
from deqir_dist.models.builtin import BUILTIN_CARD, BUILTIN_WEIGHTS, load_builtin  # noqa: E402
from deqir_dist.models.settings import check_card  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--candidate", required=True, help="weights written by deqir train-prior (its card beside it)")
    p.add_argument("--sampler", required=True, help="JSON file: the card's sampler section")
    p.add_argument("--data", help="the --data folder the candidate trained on (for provenance)")
    p.add_argument("--lineage", help="JSON list of the earlier runs these weights continue")
    p.add_argument("--note", help="replaces the round's note in the card")
    a = p.parse_args(argv)
    weights = Path(a.candidate)
    card = json.loads(weights.with_suffix(".json").read_text())
    blob = weights.read_bytes()
    if hashlib.sha256(blob).hexdigest() != card["weights"]["sha256"]:
        print(f"ship_prior.py: {weights} does not match its card's sha256", file=sys.stderr)
        return 2
    sampler = json.loads(Path(a.sampler).read_text())
    check_card(sampler, a.sampler)
    card["sampler"] = sampler
    if a.data:
        used = {i["name"] for i in card["data"]["train_images"]} | {i["name"] for i in card["data"]["heldout_images"]}
        prov = _data_provenance(a.data, used)
        if prov:
            card["summary"] = card_summary([i["name"] for i in card["data"]["train_images"]], prov)
            card["data"]["source"] = card["data"]["source"].split(" and ")[0] + " and " + prov["source"]
            card["data"]["files"], card["data"]["data_command"] = prov["files"], prov["command"]
    lineage = json.loads(Path(a.lineage).read_text()) if a.lineage else []
    t = card["training"]
    lineage.append({"weights_sha256": card["weights"]["sha256"], "command": card["command"],
                    "wall_minutes": round(t["wall_seconds"] / 60, 1), "steps": t.get("steps_done", t["steps"])})
    card["lineage"] = {"runs": lineage, "total_wall_minutes": round(sum(r["wall_minutes"] for r in lineage), 1),
                       "note": "each run after the first fine-tunes the previous run's weights (--init)"}
    card["round"] = {**card.get("round", {}), "status": "shipped", **({"note": a.note} if a.note else {})}
    previous = json.loads(BUILTIN_CARD.read_text()) if BUILTIN_CARD.is_file() else {}
    if "retraining" in previous or "retraining" in card:
        card["retraining"] = {**previous.get("retraining", {}), **card.get("retraining", {}),
                              "status": f"the shipped weights are the lineage's last run (sha256 "
                                        f"{card['weights']['sha256'][:12]}); further rounds fine-tune them with "
                                        "--init and ship through bench/ship_prior.py when they beat them on the "
                                        "held-out photographs"}
    shutil.copyfile(weights, BUILTIN_WEIGHTS)
    write_json(BUILTIN_CARD, card)
    load_builtin()      # the shipped pair loads (config, held-out images, card checks)
    print(f"shipped {weights} ({len(blob)} bytes, sha256 {card['weights']['sha256'][:12]}) as {BUILTIN_WEIGHTS}; "
          f"lineage {card['lineage']['total_wall_minutes']} wall minutes over {len(lineage)} runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
