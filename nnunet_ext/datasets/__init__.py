"""Dataset files: nnU-Net raw dataset writing and checks, image readers, synthetic data, sparsification, instances."""
