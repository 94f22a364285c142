"""fasttrain's benchmarks: the tutorial's plain loop as the reference, and the speed ladder."""
