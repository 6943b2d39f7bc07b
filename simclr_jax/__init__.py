"""SimCLR in JAX/Flax: pretrain, probe and fine-tune ResNet encoders on any number of devices."""
