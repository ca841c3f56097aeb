# Hydra config groups for fwsel, shipped in the package as fwsel.conf.
