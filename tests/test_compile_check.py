import os
import subprocess
import sys

from segguided_jax.compilation.compile_check import all_reduce_bytes, collective_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_all_reduce_bytes_counts_hlo_results():
    hlo = """
  %a = f32[10,4]{1,0} all-reduce(f32[10,4]{1,0} %x), replica_groups={}
  %b = (f32[3]{0}, bf16[8]{0}) all-reduce(f32[3]{0} %y, bf16[8]{0} %z)
  %c = f32[100]{0} add(f32[100]{0} %p, f32[100]{0} %q)
"""
    assert all_reduce_bytes(hlo) == 10 * 4 * 4 + 3 * 4 + 8 * 2


def test_collective_bytes_counts_an_async_pair_once_at_its_done():
    # TPU HLO: a -start's result holds operand, result and context; only the -done's is the data moved.
    hlo = """
  %s = (bf16[2,64,128]{2,1,0}, bf16[2,64,128]{2,1,0}, u32[], u32[]) collective-permute-start(bf16[2,64,128]{2,1,0} %x), source_target_pairs={{0,1}}
  %d = bf16[2,64,128]{2,1,0} collective-permute-done((bf16[2,64,128]{2,1,0}, bf16[2,64,128]{2,1,0}, u32[], u32[]) %s)
  %r = f32[1000]{0} all-reduce-start(f32[1000]{0} %g), to_apply=%add
  %rd = f32[1000]{0} all-reduce-done(f32[1000]{0} %r)
  %p = f32[16]{0} collective-permute(f32[16]{0} %y), source_target_pairs={{1,0}}
"""
    assert collective_bytes(hlo, "collective-permute") == 2 * 64 * 128 * 2 + 16 * 4
    assert collective_bytes(hlo, "all-reduce") == 1000 * 4
    assert collective_bytes(hlo, "all-gather") == 0


def test_compile_check_reports_memory_and_all_reduce_for_tiny_on_two_devices():
    out = subprocess.run([sys.executable, "-m", "segguided_jax.compile_check", "--config=configs/tiny.py",
                          "--devices=2"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "cpu x2 devices" in out.stdout and "per device: arguments" in out.stdout
    mib = float(out.stdout.split("all-reduced per step, per device: ")[1].split()[0])
    assert mib > 0  # two data-parallel devices must all-reduce their gradients


def test_largest_batch_search_finds_the_boundary_from_either_side(monkeypatch):
    from segguided_jax.compilation import compile_check as cc

    def compiler(limit):  # batches up to `limit` fit a v5e chip, 3 GiB each
        def compile_for_topology(config, topology, batch, what="train"):
            return cc.Figures(topology=topology, what=what, chips=1, hosts=1, data=1, spatial=1, batch=batch,
                              chip=cc.CHIPS["TPU v5 lite"], error=None if batch <= limit else "out of HBM",
                              peak=batch * 3 * 2**30, temporaries=batch * 3 * 2**30)
        return compile_for_topology

    for limit, starts in ((5, (1, 2, 5, 6, 9)), (0, (1, 3))):
        monkeypatch.setattr(cc, "compile_for_topology", compiler(limit))
        for start in starts:
            best, tried = cc.largest_batch(None, "v5e:1x1", cc.compile_for_topology(None, "v5e:1x1", start))
            assert best == limit, (limit, start, best)
            assert any(f.batch == limit + 1 and not f.fits for f in tried)  # the boundary was compiled
    # A small model: thousands per chip, with memory that grows slower than the first compile's
    # temporaries per sample suggest (the guess is 20 % short) or faster (it is 30 % over).
    for growth in (0.8, 1.3):
        def compile_for_topology(config, topology, batch, what="train", growth=growth):
            peak = 2**30 + batch * growth * 2**20
            return cc.Figures(topology=topology, what=what, chips=1, hosts=1, data=1, spatial=1, batch=batch,
                              chip=cc.CHIPS["TPU v5 lite"], error=None if peak <= 16 * 2**30 else "out of HBM",
                              peak=peak, temporaries=batch * 2**20 if batch == 2 else peak)
        monkeypatch.setattr(cc, "compile_for_topology", compile_for_topology)
        best, tried = cc.largest_batch(None, "v5e:1x1", compile_for_topology(None, "v5e:1x1", 2))
        assert best == int(15 * 1024 / growth), (growth, best)
        assert len(tried) <= 24, (growth, len(tried))  # bracket and bisect, not one batch at a time
