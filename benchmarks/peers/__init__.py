"""hf_qlimit against other quantization tools: `run` drives one `worker` process per (tool, model, setting) under
the tool's own interpreter; `peer_eval` is the protocol they share, `tool_<name>` each tool's adapter.

The worker runs as `python -m benchmarks.peers.worker` with the repository root as its working directory (`run`
sets it), which is how the peers' virtual environments, which do not have this checkout installed, find
`benchmarks` and `hf_qlimit`.
"""
