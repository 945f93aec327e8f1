"""serve.metrics and serve.ray_metrics: a deployment's /metrics is the exact sum of its replicas'."""
from deqir_dist.serve.metrics import Metrics
from deqir_dist.serve.ray_metrics import MetricsHub


def _feed(m: Metrics, ok: int, bad: int, latencies, ready: int, queue: int) -> Metrics:
    m.inc("deqir_requests_total", ok, outcome="ok")
    if bad:
        m.inc("deqir_requests_total", bad, outcome="bad_request")
    for v in latencies:
        m.observe("deqir_request_seconds", v, phase="total")
    m.observe("deqir_batch_size", len(latencies))
    m.set("deqir_ready", m.gauges["deqir_ready"] + ready)
    m.set("deqir_queue_depth", m.gauges["deqir_queue_depth"] + queue)
    return m


def _server(*args) -> Metrics:
    return _feed(Metrics(), *args)


def _series(text: str) -> dict[str, float]:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def test_merged_is_the_sum_of_the_replicas_as_one_server_would_count():
    runs = [(3, 1, [0.02, 0.7], 1, 2), (5, 0, [0.2, 3.0, 40.0], 0, 1)]
    merged = _series(Metrics.merged([_server(*r).snapshot() for r in runs]).render())
    one = Metrics()                                 # one server that saw every request
    for r in runs:
        _feed(one, *r)
    assert merged.pop("deqir_replicas") == 2 and merged["deqir_ready"] == 1     # ready replicas
    assert merged == _series(one.render())
    assert merged['deqir_request_seconds_bucket{le="1",phase="total"}'] == 3
    assert abs(merged['deqir_request_seconds_sum{phase="total"}'] - 43.92) < 1e-9
    assert merged['deqir_requests_total{outcome="ok"}'] == 8 and merged["deqir_queue_depth"] == 3


def test_hub_sums_the_fresh_replicas_and_forgets_a_silent_or_stopped_one():
    hub = MetricsHub(stale_s=10.0)
    hub.put("r1", _server(3, 0, [0.1], 1, 0).snapshot(), now=100.0)
    hub.put("r2", _server(4, 0, [0.1], 1, 0).snapshot(), now=105.0)
    s = _series(hub.render(now=106.0))
    assert s["deqir_replicas"] == 2 and s['deqir_requests_total{outcome="ok"}'] == 7
    s = _series(hub.render(now=112.0))                  # r1 silent for 12 s: dropped (it died)
    assert s["deqir_replicas"] == 1 and s['deqir_requests_total{outcome="ok"}'] == 4
    hub.drop("r2")                                       # r2 stopped (drained)
    s = _series(hub.render(now=112.5))
    assert s["deqir_replicas"] == 0 and s["deqir_requests_total"] == 0
