"""Does a trainer beat stock nnU-Net? Accuracy benchmark and its data recipes, speed and memory ratios, the demo."""
