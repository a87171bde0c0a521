"""All a loaded checkpoint runs: quantized modules, their packed integer weights, torch's int4/int8 kernels and
the memory hand-back after conversion. Never imports the calibration engine or the exporters."""
