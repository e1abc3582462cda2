"""`gitcap bench`: training and decoding throughput, FLOPs utilisation and peak memory of real
architectures with random weights (nothing downloaded)."""
