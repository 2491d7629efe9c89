"""Many Macs: pipeline parallelism over mx.distributed, the layer split, the launch entry."""
