"""The MONAI peer of benchmarks/vs_monai.py: a DynUNet train step in PyTorch, timed on request.

Runs under the peer's own interpreter (a venv with torch and monai, which vs_monai.py creates),
never under the project's. Started by vs_monai.py as

    PEER_PYTHON benchmarks/monai_peer.py '{"patch": 32, "widths": [8, 16, 32, 64], "batch": 2,
                                          "down_kernel": 3, "threads": 2, "dtype": "float32"}'

The network matches ours where DynUNet allows: residual blocks (conv3³–IN–LeakyReLU–conv3³–IN,
1³ conv + IN skip when the width or stride changes), affine instance norm, LeakyReLU 0.01,
stride-2 downsampling, 2³ stride-2 transposed-conv upsampling, a 1³ head with 3 sigmoid outputs,
no deep supervision. DynUNet puts the stride in the first conv of each stage's residual block and
uses one kernel per stage for both convs, so a 2³ downsampling kernel cannot be expressed (its
stride-1 conv would need 2³ too): only 3³ is accepted. Loss: MONAI's DiceCELoss (sigmoid Dice +
BCE, batch Dice) on region targets; optimiser: torch.optim.AdamW. dtype "bfloat16" runs the
forward under CPU autocast (parameters and optimiser in float32).

Protocol (one JSON object per line on stdout): first {"ready": ..., "params", "flops", versions};
then for each line "N" read from stdin, N train steps and {"steps": [wall seconds], "cpu": [process CPU seconds]}; "quit" ends.
"""
from __future__ import annotations

import json
import sys
import time

import torch
from monai.losses import DiceCELoss
from monai.networks.nets import DynUNet


def build(spec):
    if spec["down_kernel"] != 3:
        raise SystemExit(f"monai_peer: DynUNet needs a 3³ downsampling kernel, got {spec['down_kernel']}")
    n = len(spec["widths"])
    net = DynUNet(spatial_dims=3, in_channels=4, out_channels=3, kernel_size=[3] * n,
                  strides=[1] + [2] * (n - 1), upsample_kernel_size=[2] * (n - 1),
                  filters=list(spec["widths"]), norm_name=("INSTANCE", {"affine": True}),
                  act_name=("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
                  deep_supervision=False, res_block=True)
    return net


def main():
    spec = json.loads(sys.argv[1])
    torch.manual_seed(0)
    torch.set_num_threads(spec["threads"])
    b, p = spec["batch"], spec["patch"]
    net = build(spec)
    loss_fn = DiceCELoss(sigmoid=True, batch=True, smooth_nr=1e-5, smooth_dr=1e-5)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
    x = torch.randn(b, 4, p, p, p)
    # Region targets (ET, TC, WT) from random labels 0..3, as ours derives them.
    labels = torch.randint(0, 4, (b, p, p, p))
    y = torch.stack([labels == 3, (labels == 1) | (labels == 3), labels > 0], dim=1).float()
    bf16 = spec["dtype"] == "bfloat16"

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = net(x)
        loss = loss_fn(logits.float(), y)
        loss.backward()
        opt.step()
        return loss

    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        step()
    for _ in range(2):  # warm-up: allocator, oneDNN primitive caches
        step()
    params = sum(t.numel() for t in net.parameters())
    print(json.dumps({"ready": True, "params": params, "flops": counter.get_total_flops(),
                      "torch": torch.__version__, "monai": __import__("monai").__version__,
                      "python": sys.version.split()[0], "threads": torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "quit":
            break
        times, cpu = [], []
        for _ in range(int(cmd)):
            t, c = time.perf_counter(), time.process_time()
            loss = step().item()  # waits for the step
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        print(json.dumps({"steps": times, "cpu": cpu, "loss": loss}), flush=True)


if __name__ == "__main__":
    main()
