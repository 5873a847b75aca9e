"""The rank-elastic inference server: ``matlora serve``."""
