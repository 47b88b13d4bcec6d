"""Stage "extract": the frozen ImageNet ResNet run once over every image -> features.h5."""
