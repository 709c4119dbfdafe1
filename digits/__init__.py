"""The digits set that scikit-learn ships (1,797 8x8 images, 10 classes): the offline stand-in
for ImageNet in the quickstart, and a classifier that judges samples of it."""
