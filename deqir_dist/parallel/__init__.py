"""What blocks of the chain exchange: the ``Comm`` protocol, ``LocalComm`` (one process, no
collectives) and ``DistComm`` (torch.distributed)."""
