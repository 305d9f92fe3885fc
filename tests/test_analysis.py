"""Tests of relora_ext.analysis: effective rank, update spectra, optimizer-state bytes, TrainingStats; and a
quick run of benchmarks/rank_teacher.py (a known-answer task)."""

import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import relora_ext
from relora_ext.analysis import TrainingStats, UpdateTracker, effective_rank, optimizer_state_bytes, update_spectrum

ROOT = Path(__file__).resolve().parent.parent


def random_orthogonal(n, seed):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q


class TestEffectiveRank:
    @pytest.mark.parametrize("k", [1, 3, 7])
    def test_flat_spectrum_entropy_is_k(self, k):
        s = torch.cat([torch.full((k,), 2.5), torch.zeros(5)])
        assert effective_rank(s) == pytest.approx(k, rel=1e-9)

    def test_entropy_between_one_and_rank(self):
        s = torch.tensor([10.0, 1.0, 0.1, 0.01])
        e = effective_rank(s)
        assert 1.0 < e < 4.0
        # reference: exp of the Shannon entropy of s / sum(s)
        p = s.double() / s.double().sum()
        assert e == pytest.approx(math.exp(-float((p * p.log()).sum())), rel=1e-12)

    def test_threshold(self):
        s = torch.tensor([1.0, 0.5, 0.02, 0.005])
        assert effective_rank(s, method="threshold", rtol=1e-2) == 3.0
        assert effective_rank(s, method="threshold", rtol=0.1) == 2.0

    def test_matrix_input_matches_svd(self):
        q1, q2 = random_orthogonal(12, 0), random_orthogonal(12, 1)
        s = torch.tensor([5.0, 4.0, 3.0, 1.0] + [0.0] * 8, dtype=torch.float64)
        m = (q1 * s) @ q2.T  # known singular values
        assert effective_rank(m.float(), method="threshold", rtol=1e-3) == 4.0
        assert effective_rank(m.float()) == pytest.approx(effective_rank(s.float()), rel=1e-4)

    def test_zero_is_zero(self):
        assert effective_rank(torch.zeros(4, 6)) == 0.0
        assert effective_rank(torch.zeros(3), method="threshold") == 0.0

    def test_bad_input(self):
        with pytest.raises(ValueError, match="method"):
            effective_rank(torch.ones(3), method="nuclear")
        with pytest.raises(ValueError, match="shape"):
            effective_rank(torch.ones(2, 2, 2))
        with pytest.raises(ValueError, match="NaN"):
            effective_rank(torch.tensor([1.0, float("nan")]))
        with pytest.raises(TypeError, match="torch.Tensor"):
            effective_rank([1.0, 2.0])


class TestUpdateSpectrum:
    def test_lora_update_has_rank_r(self):
        torch.manual_seed(0)
        layer = relora_ext.LoRALinear(40, 24, r=3)
        w0 = layer.weight.detach().clone()
        assert float(update_spectrum(layer, w0).max()) == 0.0  # B = 0: no update yet
        with torch.no_grad():
            layer.lora_B.normal_()
        s = update_spectrum(layer, w0)
        assert s.shape == (24,)
        assert effective_rank(s, method="threshold", rtol=1e-4) == 3.0
        # the reference: singular values of s * B @ A
        ref = torch.linalg.svdvals(layer.scaling * layer.lora_B.detach().double() @ layer.lora_A.detach().double())
        torch.testing.assert_close(s.double(), ref, atol=1e-5, rtol=1e-4)

    def test_merge_and_reset_keeps_the_spectrum(self):
        torch.manual_seed(1)
        layer = relora_ext.LoRALinear(32, 32, r=4)
        w0 = layer.weight.detach().clone()
        with torch.no_grad():
            layer.lora_B.normal_()
        before = update_spectrum(layer, w0)
        layer.merge_and_reset_(seed=0, offset=0)
        torch.testing.assert_close(update_spectrum(layer, w0), before, atol=1e-5, rtol=1e-4)

    def test_cycles_accumulate_rank_k_times_r(self):
        """Over k cycles W − W₀ reaches rank k·r; LoRA (no merge) stays at r."""
        torch.manual_seed(2)
        r, k = 3, 4
        model = relora_ext.wrap(nn.Sequential(nn.Linear(48, 48)), r=r, target_modules=["0"])
        tracker = UpdateTracker(model)
        layer = model[0]
        ranks = []
        for c in range(k):
            with torch.no_grad():
                layer.lora_B.normal_()
            layer.merge_and_reset_(seed=0, offset=c)
            ranks.append(tracker.effective_ranks(method="threshold", rtol=1e-4)["0"])
        assert ranks == [float(r * (c + 1)) for c in range(k)]

    def test_plain_linear_and_bad_w0(self):
        lin = nn.Linear(8, 5)
        w0 = lin.weight.detach().clone()
        with torch.no_grad():
            lin.weight.add_(torch.outer(torch.ones(5), torch.arange(8.0)))
        s = update_spectrum(lin, w0)
        assert effective_rank(s, method="threshold", rtol=1e-5) == 1.0
        with pytest.raises(ValueError, match=r"\(5, 8\)"):
            update_spectrum(lin, torch.zeros(8, 5))
        with pytest.raises(TypeError, match="2-D"):
            update_spectrum(nn.ReLU(), w0)

    def test_tracker_needs_layers(self):
        with pytest.raises(ValueError, match="no layer"):
            UpdateTracker(nn.Sequential(nn.Linear(4, 4)))
        with pytest.raises(ValueError, match="exactly one"):
            UpdateTracker()


def _adam_step(params, opt):
    loss = sum((p ** 2).sum() for p in params)
    loss.backward()
    opt.step()
    opt.zero_grad()


class TestOptimizerStateBytes:
    def test_adamw_counts_both_moments(self):
        lin = nn.Linear(10, 7)
        opt = torch.optim.AdamW(lin.parameters())
        assert optimizer_state_bytes(opt) == 0
        _adam_step(list(lin.parameters()), opt)
        moments = 2 * (70 + 7) * 4
        steps = sum(st["step"].numel() * st["step"].element_size() for st in opt.state.values())
        assert optimizer_state_bytes(opt) == moments + steps

    def test_nested_objects_and_shared_tensors_counted_once(self):
        class Projector:
            def __init__(self):
                self.ortho = torch.zeros(16, 4)

        p = nn.Parameter(torch.zeros(3))
        opt = torch.optim.SGD([p], lr=0.1)
        shared = torch.zeros(5, dtype=torch.float64)
        opt.state[p] = {"proj": Projector(), "a": shared, "b": [shared, torch.zeros(2, dtype=torch.int8)]}
        assert optimizer_state_bytes(opt) == 16 * 4 * 4 + 5 * 8 + 2

    def test_relora_state_is_a_small_share_of_full(self):
        torch.manual_seed(0)
        full = nn.Sequential(nn.Linear(64, 64, bias=False), nn.Linear(64, 64, bias=False))
        lora = relora_ext.wrap(nn.Sequential(nn.Linear(64, 64, bias=False), nn.Linear(64, 64, bias=False)), r=4,
                               target_modules=["0", "1"])
        o_full = torch.optim.AdamW(full.parameters())
        o_lora = relora_ext.ReLoRAOptimizer(torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad]), lora,
                                            reset_every=10)
        _adam_step(list(full.parameters()), o_full)
        _adam_step([p for p in lora.parameters() if p.requires_grad], o_lora)
        # AdamW moments: full 2·(2·64·64) floats; LoRA 2·(2·(4·64 + 64·4)) floats (+ the step scalars)
        assert optimizer_state_bytes(o_full) - 2 * 4 == 2 * 2 * 64 * 64 * 4
        assert optimizer_state_bytes(o_lora) - 4 * 4 == 2 * 2 * 2 * 64 * 4 * 4


class TestTrainingStats:
    def make(self, steps=12, reset_every=5):
        torch.manual_seed(0)
        model = relora_ext.wrap(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)), r=2,
                                target_modules=["0"])
        params = [p for p in model.parameters() if p.requires_grad]
        opt = relora_ext.ReLoRAOptimizer(torch.optim.AdamW(params, lr=1e-2), model, reset_every=reset_every)
        for _ in range(steps):
            model(torch.randn(8, 16)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        return model, opt

    def test_fields(self):
        model, opt = self.make()
        st = TrainingStats.collect(model, opt, val_loss=1.5)
        total = 16 * 32 + 32 + 32 * 4 + 4
        trainable = 32 + 2 * 16 + 32 * 2 + 32 * 4 + 4  # bias0, A, B, layer 2 (weight + bias)
        assert (st.steps, st.cycles, st.reset_every) == (12, 2, 5)
        assert (st.params, st.trainable, st.lora_layers, st.ranks) == (total + 2 * 16 + 32 * 2, trainable, 1, (2,))
        assert st.trainable_share == pytest.approx(trainable / st.params)
        assert st.optimizer_state_bytes == optimizer_state_bytes(opt) > 0
        assert 0 < st.prune_kept_share < 0.05  # 99% pruned at the last cycle
        assert st.extra == {"val_loss": 1.5}

    def test_repr_and_html(self):
        model, opt = self.make()
        st = TrainingStats.collect(model, opt, note="<b>x</b>")
        text = repr(st)
        assert text.startswith("TrainingStats")
        for needle in ("steps", ": 12", "ReLoRA* cycles", "2 (every 5 steps)", "trainable", "%", "optimizer state",
                       "KiB", "r = 2"):
            assert needle in text, (needle, text)
        h = st._repr_html_()
        assert h.startswith("<table>") and h.endswith("</table>")
        assert "&lt;b&gt;x&lt;/b&gt;" in h and "<b>x</b>" not in h.replace("<b>TrainingStats</b>", "")

    def test_plain_model_and_optimizer(self):
        lin = nn.Linear(4, 4)
        opt = torch.optim.AdamW(lin.parameters())
        for _ in range(3):
            _adam_step(list(lin.parameters()), opt)
        st = TrainingStats.collect(lin, opt)
        assert (st.steps, st.cycles, st.lora_layers, st.trainable_share) == (3, 0, 0, 1.0)
        assert "ReLoRA* cycles" in repr(st) and "state kept" not in repr(st)
        assert TrainingStats.collect(lin).optimizer_state_bytes == 0
        with pytest.raises(TypeError, match="nn.Module"):
            TrainingStats.collect(opt)


def test_rank_teacher_quick(tmp_path):
    """The known-answer benchmark, tiny: LoRA sits on its Eckart–Young floor, ReLoRA* breaks through it."""
    pytest.importorskip("matplotlib")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import rank_teacher
    finally:
        sys.path.pop(0)
    s = rank_teacher.main(["--quick", "--out-dir", str(tmp_path), "--plot", str(tmp_path / "rt.png")])
    assert (tmp_path / "rt.png").stat().st_size > 10_000
    assert (tmp_path / "rank_teacher.json").exists()
    floor = s["lora_floor"][0]
    assert s["final"]["lora"] >= floor * (1 - 1e-6)          # cannot beat Eckart–Young
    assert s["final"]["lora"] <= floor * 1.05                # and gets there
    assert s["goals"]["relora_vs_lora_floor"] >= 10
    assert s["goals"]["relora_vs_full"] <= 2
    rel = s["runs"]["relora"][0]
    assert rel["cycles"] == 12 and rel["final_rank_threshold"] > 4 * 2  # rank beyond r after the cycles
    assert s["runs"]["lora"][0]["final_rank_threshold"] <= 4


@pytest.fixture(scope="module")
def train_lm():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import train_lm
    finally:
        sys.path.pop(0)
    return train_lm


def _tiny_lm_config(train_lm, method):
    args = train_lm.build_parser().parse_args(["--tiny"])
    args.dim, args.layers, args.steps, args.warmup, args.reset_every, args.restart_warmup = 32, 1, 6, 1, 3, 1
    args.eval_every, args.eval_windows, args.final_eval_windows = 3, 4, 8
    args.batch_size, args.seq_len = 4, 32
    return train_lm.run_config(args, method, 8, 3e-3, 0)


@pytest.mark.parametrize("method", ["full", "peft_lora", "lora", "relora", "galore", "sst"])
def test_train_lm_worker_tiny(train_lm, threads, method):
    """Every method of benchmarks/train_lm.py sets up, trains a few steps and reports what the table needs."""
    if method == "peft_lora":
        pytest.importorskip("peft")
    if method == "galore":
        pytest.importorskip("galore_torch")
    threads(1)
    full = train_lm.worker(_tiny_lm_config(train_lm, "full"))
    res = full if method == "full" else train_lm.worker(_tiny_lm_config(train_lm, method))
    assert not res["diverged"] and math.isfinite(res["val_loss"])
    assert res["val_loss"] < res["curve"][0]["val_loss"]  # it learned something in 6 steps
    assert res["tokens_per_s"] > 0 and res["peak_rss_mib"] >= res["rss_before_model_mib"] > 0
    assert res["params"] == full["params"]
    if method in ("peft_lora", "lora", "relora", "sst"):
        assert res["trainable"] < full["trainable"]
    if method != "full":
        assert res["optimizer_state_bytes"] < full["optimizer_state_bytes"]
    assert res["cycles"] == (2 if method in ("relora", "sst") else 0)
