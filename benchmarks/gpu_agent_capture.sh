#!/usr/bin/env bash
# The whole agent on a real NVIDIA machine: probe idle and under a bf16 matmul load next to
# nvidia-smi -q -x, and `capmon agent run` (5 s windows) across the load starting and stopping.
# Writes into $OUT (default ./gpu-capture). Needs torch for the load; installs capmon into /tmp/site.
OUT=${OUT:-$PWD/gpu-capture}; mkdir -p "$OUT"
set -x
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1; fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/site . || exit 1
export PYTHONPATH=/tmp/site
C="python3 -m capmon.agent.cli"
nvidia-smi -L
$C agent probes | tee $OUT/agent_probes.txt
$C agent probe | tee $OUT/agent_probe_idle.txt
$C agent probe --json > $OUT/agent_probe_idle.json; nvidia-smi -q -x > $OUT/nvidia_smi_idle.xml
printf '[agent]\nid = "h100-test"\nwindow_s = 5\noutput = "%s/agent_run.jsonl"\n[classifier]\nbusy_grace_s = 4.0\n' "$OUT" > /tmp/agent.toml
$C agent run --config /tmp/agent.toml 2> $OUT/agent_run.log &
AG=$!
sleep 11
python3 - <<'PY' &
import torch, time
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16); b = torch.randn_like(a)
t = time.time()
while time.time() - t < 16:
    for _ in range(50): a @ b
    torch.cuda.synchronize()
PY
LOAD=$!
sleep 8
$C agent probe | tee $OUT/agent_probe_busy.txt
$C agent probe --json > $OUT/agent_probe_busy.json; nvidia-smi -q -x > $OUT/nvidia_smi_busy.xml
wait $LOAD
sleep 22
kill -INT $AG; wait $AG
echo "agent exit $?"
wc -l $OUT/agent_run.jsonl
