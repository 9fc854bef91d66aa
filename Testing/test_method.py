"""The CoreDiff method: operator, schedule, network, sampler, training."""
from __future__ import annotations

import json
import re
import time

import numpy as np
import pytest
import torch

from CoreDiffLib.degradation import alpha_schedule, degrade
from CoreDiffLib.diffusion import sample, step_indices
from CoreDiffLib import CoreDiffError
from CoreDiffLib.network import ClearNet, NetworkConfig, count_parameters, widened
from CoreDiffLib.intensity import hu_to_unit
from CoreDiffLib.metrics import ssim, ssim_local_mean, ssim_map, ssim_terms
from CoreDiffLib.training import (MSE_ONLY, LossTerms, PairedSlices, TrainConfig, corediff_loss, local_level,
                                  mirror_neighbour_noise, restoration_loss, train, window_ssim, ssim_local_mean as ssim_window_mean)

from conftest import synthetic_ct


def test_schedule_matches_reference_values():
    a = alpha_schedule(10)
    expected = [0.999] + [1 - t / 9 for t in range(1, 10)]
    assert torch.allclose(a, torch.tensor(expected), atol=1e-6)
    assert a[-1] == 0 and a[0] == pytest.approx(0.999)
    assert torch.all(a[1:] < a[:-1])
    assert alpha_schedule(1).tolist() == [0.0]
    with pytest.raises(ValueError):
        alpha_schedule(0)


def test_operator_is_the_formula_and_preserves_the_mean():
    g = torch.Generator().manual_seed(0)
    x0, xT = torch.rand(2, 1, 8, 8, generator=g), torch.rand(2, 1, 8, 8, generator=g)
    for a in alpha_schedule(10):
        out = degrade(x0, xT, a)
        assert torch.allclose(out, a * x0 + (1 - a) * xT)
        assert out.mean() == pytest.approx(float(a * x0.mean() + (1 - a) * xT.mean()), abs=1e-6)
    per_sample = degrade(x0, xT, torch.tensor([1.0, 0.0]))
    assert torch.equal(per_sample[0], x0[0]) and torch.equal(per_sample[1], xT[1])


def test_paper_configuration_has_about_4_8_million_parameters():
    n = count_parameters(ClearNet(NetworkConfig()))
    assert 4.7e6 < n < 4.9e6, n


def test_ablations_change_the_architecture():
    full = ClearNet(NetworkConfig(width=8))
    no_ctx = ClearNet(NetworkConfig(width=8, use_context=False))
    no_emm = ClearNet(NetworkConfig(width=8, use_emm=False))
    assert full.enc1[0].in_channels == 3 and no_ctx.enc1[0].in_channels == 1
    assert full.emm is not None and no_emm.emm is None
    assert count_parameters(no_emm) < count_parameters(full)


def test_emm_changes_the_output_only_when_given_a_previous_estimate():
    torch.manual_seed(0)
    net = ClearNet(NetworkConfig(width=8)).eval()
    torch.nn.init.normal_(net.out.weight, std=0.1)  # the output conv starts at zero (identity)
    x = torch.rand(1, 3, 32, 32)
    t = torch.tensor([4])
    plain = net(x, t)
    modulated = net(x, t, x0_prev=torch.rand(1, 1, 32, 32), xT=x[:, 1:2])
    assert plain.shape == (1, 1, 32, 32)
    assert not torch.allclose(plain, modulated)


class RecordingNet(ClearNet):
    """CLEAR-Net that records what the sampler feeds it."""

    def __init__(self):
        super().__init__(NetworkConfig(width=8))
        self.calls = []
        self.xTs = []  # what the EMM is given as the LDCT, call by call

    def forward(self, x, t, x0_prev=None, xT=None):
        self.calls.append((x.clone(), t.clone(), None if x0_prev is None else x0_prev.clone()))
        self.xTs.append(None if xT is None else xT.clone())
        return super().forward(x, t, x0_prev, xT)


def test_sampler_starts_from_the_ldct_and_returns_every_step():
    torch.manual_seed(0)
    net = RecordingNet().eval()
    stack = torch.rand(2, 3, 30, 34)  # odd sizes: the sampler pads internally
    result = sample(net, stack)
    assert result.final.shape == (2, 1, 30, 34)
    assert result.steps.shape == (10, 2, 1, 30, 34)
    assert len(net.calls) == 10
    first_x, first_t, first_prev = net.calls[0]
    assert torch.equal(first_x[:, :, :30, :34], stack)      # warm start: x_T is the LDCT itself
    assert first_t.tolist() == [9, 9] and first_prev is None  # no EMM on the first step
    assert [c[1][0].item() for c in net.calls] == list(range(9, -1, -1))
    outputs = []
    net.register_forward_hook(lambda m, i, o: outputs.append(o.clone()))
    net.calls.clear()
    sample(net, stack)
    for k, (x, _, prev) in enumerate(net.calls[1:]):
        assert torch.equal(x[:, 0, :30, :34], stack[:, 0])    # neighbours stay raw LDCT
        assert torch.equal(x[:, 2, :30, :34], stack[:, 2])
        assert torch.equal(prev, outputs[k])                  # EMM sees the latest x0 estimate
        assert torch.equal(net.xTs[k + 1][:, :, :30, :34], stack[:, 1:2])  # ... beside the LDCT, not x_t
    assert torch.allclose(result.final, result.steps[-1].clamp(0, 1))
    assert result.final.min() >= 0 and result.final.max() <= 1


def test_the_emm_reads_the_previous_estimate_then_the_ldct_in_that_order():
    """The shipped weights learned the EMM's input channels in this order (x0_prev, xT): swapped,
    every model would read each as the other."""
    from CoreDiffLib.network import ErrorModulation
    torch.manual_seed(0)
    emm = ErrorModulation(channels=8, width=8).eval()
    with torch.no_grad():
        emm.features[0].weight[:, 1] = 0  # blind to the second channel
    x0_prev, xT = torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        gamma, beta = emm(x0_prev, xT)
        assert torch.equal(torch.cat(emm(x0_prev, torch.rand(1, 1, 32, 32))), torch.cat([gamma, beta]))
        assert not torch.equal(torch.cat(emm(torch.rand(1, 1, 32, 32), xT)), torch.cat([gamma, beta]))


class OracleNet(ClearNet):
    """Returns the true clean image whatever it is asked: the sampler's states are then the
    degradation's own path, D(x0, xT, a) at the next step's a."""

    def __init__(self, x0: torch.Tensor):
        super().__init__(NetworkConfig(width=8))
        self.x0 = x0

    def forward(self, x, t, x0_prev=None, xT=None):
        return self.x0


def test_the_kept_steps_are_the_sampler_states_from_the_ldct_to_the_clean_image():
    """One-shot adaptation blends the states (the reference code's imstep_imgs), which run from
    nearly the LDCT to the estimate, not the per-step x0 estimates (each one fully denoised)."""
    torch.manual_seed(0)
    x0, ldct = torch.rand(1, 1, 16, 16), torch.rand(1, 1, 16, 16)
    stack = torch.cat([ldct, ldct, ldct], dim=1)
    result = sample(OracleNet(x0).eval(), stack)
    alphas = alpha_schedule(10)
    for k, state in enumerate(result.steps):  # after the step at t = 9 - k, the state is at t = 8 - k
        a = alphas[8 - k] if k < 9 else torch.tensor(1.0)
        assert torch.allclose(state, a * x0 + (1 - a) * ldct, atol=1e-5), k
    assert torch.allclose(result.steps[-1], x0, atol=1e-5) and torch.allclose(result.final, x0, atol=1e-5)
    assert (result.steps[0] - ldct).abs().mean() < 0.2 * (x0 - ldct).abs().mean()  # the first is near the LDCT


class HalfwayNet(OracleNet):
    """An imperfect network: halfway between its input and the clean image, so each step's
    estimate differs and the estimated xT leaves the LDCT (an oracle keeps both fixed)."""

    def forward(self, x, t, x0_prev=None, xT=None):
        return 0.5 * (x[:, 1:2] + self.x0)


@pytest.mark.parametrize("steps", [10, 4])
def test_the_sampler_follows_corediffs_update_with_an_imperfect_network(steps):
    """x_{t-1} = x_t - D(x0_hat, xT_hat, t) + D(x0_hat, xT_hat, t-1), xT_hat from x_t and x0_hat:
    not the naive D(x0_hat, xT, t-1), which an oracle network cannot tell apart."""
    torch.manual_seed(0)
    x0, ldct = torch.rand(1, 1, 16, 16), torch.rand(1, 1, 16, 16)
    result = sample(HalfwayNet(x0).eval(), torch.cat([ldct, ldct, ldct], dim=1), steps=steps)
    alphas, seq = alpha_schedule(10), step_indices(10, steps)
    x = ldct
    for k, s in enumerate(seq):
        a_s = alphas[s]
        a_next = alphas[seq[k + 1]] if k + 1 < len(seq) else torch.tensor(1.0)
        x0_hat = 0.5 * (x + x0)
        xT_hat = (x - a_s * x0_hat) / (1 - a_s)
        x = x + (a_next - a_s) * (x0_hat - xT_hat)
        assert torch.allclose(result.steps[k], x, atol=1e-5), k  # the naive rule fails here


def test_fewer_steps_skip_through_the_trained_schedule():
    assert step_indices(10) == list(range(9, -1, -1))
    assert step_indices(10, 1) == [9]
    assert step_indices(10, 4) == [9, 6, 3, 0] and step_indices(10, 2) == [9, 0]
    assert step_indices(10, 5) == [9, 7, 4, 2, 0]  # rounded to the nearest trained step, not cut down
    with pytest.raises(ValueError):
        step_indices(10, 11)
    # the states walk the degradation path at the skipped schedule's own a (an oracle network)
    torch.manual_seed(0)
    x0, ldct = torch.rand(1, 1, 16, 16), torch.rand(1, 1, 16, 16)
    result = sample(OracleNet(x0).eval(), torch.cat([ldct, ldct, ldct], dim=1), steps=4)
    alphas = alpha_schedule(10)
    assert result.steps.shape[0] == 4
    for state, t_next in zip(result.steps, [6, 3, 0]):
        assert torch.allclose(state, alphas[t_next] * x0 + (1 - alphas[t_next]) * ldct, atol=1e-5), t_next
    assert torch.allclose(result.steps[-1], x0, atol=1e-5)


def test_a_new_network_starts_as_the_identity_so_the_sampler_returns_the_input():
    net = ClearNet(NetworkConfig(width=8)).eval()
    stack = torch.rand(1, 3, 16, 16)
    assert torch.allclose(sample(net, stack).final, stack[:, 1:2], atol=1e-5)


def test_loss_uses_both_stages_and_stage_one_only_at_t0():
    """Stage 1 restores x_t = D(x0, xT, a_t); stage 2 restores D(x0_hat, xT, a_{t-1}) at t - 1
    with EMM given stage 1's estimate; the loss is the mean of the two MSEs (t = 0: stage 1)."""
    torch.manual_seed(0)
    cfg = NetworkConfig(width=8)
    net = RecordingNet()
    torch.nn.init.normal_(net.out.weight, std=0.05)  # not the identity, so the stages differ
    ctx, tgt = torch.rand(2, 3, 16, 16), torch.rand(2, 1, 16, 16)
    outputs = []
    net.register_forward_hook(lambda m, i, o: outputs.append(o.detach().clone()))
    loss = corediff_loss(net, cfg, ctx, tgt, t=5)
    a = alpha_schedule(10)
    (x1, t1, prev1), (x2, t2, prev2) = net.calls
    assert torch.allclose(x1[:, 1:2], degrade(tgt, ctx[:, 1:2], a[5])) and t1.tolist() == [5, 5] and prev1 is None
    assert torch.allclose(x2[:, 1:2], degrade(outputs[0], ctx[:, 1:2], a[4])) and t2.tolist() == [4, 4]
    assert torch.equal(prev2, outputs[0])  # EMM: the latest estimate
    assert torch.equal(x1[:, 0::2], ctx[:, 0::2]) and torch.equal(x2[:, 0::2], ctx[:, 0::2])
    want = 0.5 * torch.nn.functional.mse_loss(outputs[0], tgt) + 0.5 * torch.nn.functional.mse_loss(outputs[1], tgt)
    assert float(loss.detach()) == pytest.approx(float(want), rel=1e-6)
    net.calls.clear()
    outputs.clear()
    loss = corediff_loss(net, cfg, ctx, tgt, t=0)
    stage_one = torch.nn.functional.mse_loss(outputs[0], tgt)
    assert len(net.calls) == 1 and float(loss.detach()) == pytest.approx(float(stage_one))
    net.calls.clear()
    outputs.clear()
    corediff_loss(net, cfg, ctx, tgt, t=1)  # stage 2 at t - 1 = 0: the sampler's last step, the one it returns
    (x1, t1, prev1), (x2, t2, prev2) = net.calls
    assert t1.tolist() == [1, 1] and t2.tolist() == [0, 0] and torch.equal(prev2, outputs[0])
    assert torch.allclose(x2[:, 1:2], degrade(outputs[0], ctx[:, 1:2], a[0]))


def test_stage_two_trains_stage_one_through_its_input_and_takes_the_same_loss_terms():
    """Two survivors of a mutation review: stage 2's input built from a detached stage-1 estimate
    (the paper trains both stages end to end: its error then teaches stage 1 nothing), and stage
    2 scored by the plain MSE while stage 1 took --ssim-weight / --level-weight."""
    from CoreDiffLib.training import restoration_loss
    torch.manual_seed(0)
    cfg = NetworkConfig(width=8, use_emm=False)  # stage 2 then reaches stage 1 through its input alone
    net = ClearNet(cfg)
    torch.nn.init.normal_(net.out.weight, std=0.05)
    ctx, tgt = torch.rand(2, 3, 16, 16), torch.rand(2, 1, 16, 16)
    outputs = []

    def keep(module, inputs, output):
        output.retain_grad()
        outputs.append(output)
    handle = net.register_forward_hook(keep)
    corediff_loss(net, cfg, ctx, tgt, t=5).backward()
    stage_one_alone = (outputs[0] - tgt).detach() / tgt.numel()  # d(0.5 MSE(x0_hat, x0)) / d x0_hat
    assert not torch.allclose(outputs[0].grad, stage_one_alone, atol=1e-9)
    handle.remove()
    terms = LossTerms(ssim_weight=0.5, level_weight=2.0)
    outputs.clear()
    net.register_forward_hook(lambda m, i, o: outputs.append(o.detach().clone()))
    with torch.no_grad():
        loss = corediff_loss(net, cfg, ctx, tgt, 5, terms)
    want = 0.5 * restoration_loss(outputs[0], tgt, terms) + 0.5 * restoration_loss(outputs[1], tgt, terms)
    assert float(loss) == pytest.approx(float(want), rel=1e-6)
    assert float(want) != pytest.approx(float(0.5 * restoration_loss(outputs[0], tgt, terms)
                                              + 0.5 * restoration_loss(outputs[1], tgt)), rel=1e-3)


def test_the_training_ssim_is_the_reported_metric_and_has_a_gradient():
    ndct = synthetic_ct(2, 96, seed=3, noise_hu=5)
    noisy = ndct + np.random.default_rng(0).normal(0, 40, ndct.shape).astype(np.float32)
    x = torch.from_numpy(hu_to_unit(noisy))[:, None].requires_grad_(True)
    y = torch.from_numpy(hu_to_unit(ndct))[:, None]
    expected = np.mean([ssim(noisy[k], ndct[k]) for k in range(2)])
    got = window_ssim(x.double(), y.double())
    assert abs(got.item() - expected) < 1e-6 and expected < 0.99
    assert ssim_map(noisy[0], ndct[0]).shape == (96 - 10, 96 - 10)  # the window's border is not scored
    got.backward()
    assert x.grad.abs().sum() > 0
    assert float(window_ssim(y, y)) == pytest.approx(1.0, abs=1e-6)
    # weight 0 is exactly the paper's MSE; a weight adds weight x (1 - SSIM)
    x32 = x.detach().float()
    mse = torch.mean((x32 - y) ** 2)
    assert float(restoration_loss(x32, y)) == pytest.approx(float(mse), rel=1e-6)
    assert float(restoration_loss(x32, y, LossTerms(ssim_weight=1e-3))) == pytest.approx(float(mse) + 1e-3 * (1 - expected), rel=1e-4)


def test_a_few_hundred_steps_drive_the_loss_down(tmp_path):
    ndct = [synthetic_ct(6, 48, seed=s, noise_hu=5) for s in range(2)]
    rng = np.random.default_rng(1)
    pairs = [(v, v + rng.normal(0, 60, v.shape).astype(np.float32)) for v in ndct]
    cfg = TrainConfig(iterations=300, batch_size=4, patch_size=32, log_every=50, ema_start=100,
                      checkpoint_every=150, seed=0, lr=1e-3)
    ckpt = tmp_path / "run.ckpt"
    _, state = train(pairs, NetworkConfig(width=8), cfg, checkpoint=ckpt, log=lambda m: None)
    assert state.iteration == 300
    first, last = state.losses[0], state.losses[-1]
    assert last < 0.5 * first, state.losses
    assert ckpt.exists() and not (tmp_path / "run.ckpt.tmp").exists()


def test_training_resumes_from_its_checkpoint(tmp_path):
    v = synthetic_ct(4, 32, seed=3, noise_hu=5)
    pairs = [(v, v + 40 * np.random.default_rng(0).standard_normal(v.shape).astype(np.float32))]
    ckpt = tmp_path / "c.ckpt"
    cfg = TrainConfig(iterations=20, batch_size=2, patch_size=32, log_every=10, checkpoint_every=10)
    a, _ = train(pairs, NetworkConfig(width=8), cfg, checkpoint=ckpt, log=lambda m: None)
    cfg2 = TrainConfig(iterations=30, batch_size=2, patch_size=32, log_every=10, checkpoint_every=10)
    logs = []
    _, state = train(pairs, NetworkConfig(width=8), cfg2, checkpoint=ckpt, log=logs.append)
    assert state.iteration == 30 and any("resumed" in m and "20" in m for m in logs)
    with pytest.raises(CoreDiffError, match=r"another architecture than this run's \(width 8 there, 16 here "
                                            r"\(--width\)\)"):
        train(pairs, NetworkConfig(width=16), cfg2, checkpoint=ckpt, log=lambda m: None)
    with pytest.raises(CoreDiffError, match=r"\(use_emm True there, False here \(--no-emm\)\)"):  # the flag
        train(pairs, NetworkConfig(width=8, use_emm=False), cfg2, checkpoint=ckpt, log=lambda m: None)


def test_a_resumed_run_continues_the_same_run_bit_for_bit_or_is_refused(tmp_path):
    v = synthetic_ct(4, 32, seed=3, noise_hu=5)
    pairs = [(v, v + 40 * np.random.default_rng(0).standard_normal(v.shape).astype(np.float32))]

    def run(iterations, ckpt, **kw):
        cfg = TrainConfig(iterations=iterations, batch_size=2, patch_size=16, log_every=5, checkpoint_every=5,
                          ema_start=0, ema_every=5, **kw)
        return train(pairs, NetworkConfig(width=4, steps=2), cfg, checkpoint=ckpt, log=lambda m: None)[0]
    straight = run(10, tmp_path / "a.ckpt")
    run(5, tmp_path / "b.ckpt")
    resumed = run(10, tmp_path / "b.ckpt")  # the patches of iterations 6..10, not 1..5 again
    assert all(torch.equal(x, y) for x, y in zip(straight.state_dict().values(), resumed.state_dict().values()))
    with pytest.raises(CoreDiffError, match="patch_size 16 -> 32"):  # another recipe: not silently mixed
        train(pairs, NetworkConfig(width=4, steps=2), TrainConfig(iterations=20, batch_size=2, patch_size=32),
              checkpoint=tmp_path / "b.ckpt", log=lambda m: None)
    run(20, tmp_path / "b.ckpt", lr=1e-4)  # a lower learning rate for a last leg is allowed
    for damaged in (b"not a checkpoint", (tmp_path / "b.ckpt").read_bytes()[:3000]):
        (tmp_path / "d.ckpt").write_bytes(damaged)
        with pytest.raises(CoreDiffError, match="damaged or not a CoreDiff training checkpoint"):
            run(10, tmp_path / "d.ckpt")


def test_patches_come_from_every_slice_and_reach_the_last_rows_and_columns():
    """Mutation survivors: the last slice never a patch's centre (so its replicated upper
    neighbour never trained), and the bottom row and right column of patch positions never drawn."""
    s, h = 4, 20
    ndct = np.zeros((s, h, h), np.float32) + (np.arange(s, dtype=np.float32) * 100.0)[:, None, None]
    ndct[:, h - 1, h - 1] += 50.0  # a mark only a patch at the last row and column holds
    data = PairedSlices([(ndct, ndct.copy())], patch_size=h - 1, seed=0)
    _, _, clean = data.batch_with_clean_context(300)
    levels = np.rint((clean.numpy().min(axis=(2, 3)) * 4096.0 - 1024.0) / 100.0).astype(int)  # slice of each
    centres = {tuple(row) for row in levels.tolist()}
    assert {(0, 0, 1), (1, 2, 3), (2, 3, 3)} <= centres  # the ends replicated, as at inference
    assert (clean.numpy().max(axis=(2, 3)) * 4096.0 - 1024.0 - levels * 100.0 > 40.0).any()  # the corner mark


def test_a_resume_may_change_only_how_long_and_how_fast_and_never_the_data(tmp_path):
    """From a mutation review: any recipe option (seed, air share, neighbour gap, t sampling, SSIM
    weight) could be made resumable, or --time-limit, --keep-every and --threads not, and the LDCT
    dropped from the data's fingerprint (a resume on another dose of the same NDCT), all unnoticed."""
    from dataclasses import replace
    from CoreDiffLib.training import data_fingerprint, load_checkpoint
    pairs = _noisy_pair()
    net = NetworkConfig(width=4, steps=2)
    cfg = TrainConfig(iterations=2, batch_size=1, patch_size=16, log_every=1)
    train(pairs, net, cfg, checkpoint=tmp_path / "r.ckpt", log=lambda m: None)
    for change in ({"seed": 1}, {"anywhere_share": 0.5}, {"max_neighbour_gap": 2}, {"t_sampling": "late"},
                   {"ssim_weight": 0.1}, {"patch_size": 32}):
        with pytest.raises(CoreDiffError, match=f"other settings \\({next(iter(change))} "):
            load_checkpoint(tmp_path / "r.ckpt", net, replace(cfg, **change))
    for change in ({"iterations": 9}, {"time_limit_s": 60.0}, {"keep_every": 5}, {"threads": 1}, {"lr": 1e-3},
                   {"lr_schedule": "cosine"}):
        load_checkpoint(tmp_path / "r.ckpt", net, replace(cfg, **change))
    older = torch.load(tmp_path / "r.ckpt", weights_only=True)  # a checkpoint from before --anywhere-share
    del older["train_config"]["anywhere_share"]
    torch.save(older, tmp_path / "older.ckpt")
    load_checkpoint(tmp_path / "older.ckpt", net, cfg)  # it trained with the default: the same recipe
    with pytest.raises(CoreDiffError, match=r"anywhere_share 0.0 \(its default, older than the option\) -> 0.5"):
        load_checkpoint(tmp_path / "older.ckpt", net, replace(cfg, anywhere_share=0.5))
    ndct, ldct = pairs[0]
    other_dose = [(ndct, ndct + 10 * np.random.default_rng(5).standard_normal(ndct.shape).astype(np.float32))]
    assert data_fingerprint(other_dose) != data_fingerprint(pairs) == data_fingerprint(_noisy_pair())


def test_ctrl_c_saves_the_checkpoint_and_the_run_resumes_where_it_stopped(tmp_path):
    """Ctrl-C (or a scheduler's SIGTERM) lost everything since the last checkpoint; an EMA step
    at ema_start then a resume before the next one restarted the average; other data resumed
    silently; and pairs of different slice sizes crashed on stacking their patches."""
    import os
    import signal

    from CoreDiffLib.training import TrainingInterrupted
    v = synthetic_ct(4, 32, seed=3, noise_hu=5)
    pairs = [(v, v + 40 * np.random.default_rng(0).standard_normal(v.shape).astype(np.float32))]

    def run(iterations, ckpt, log=lambda m: None, data=pairs):
        cfg = TrainConfig(iterations=iterations, batch_size=2, patch_size=16, log_every=1, checkpoint_every=1000,
                          ema_start=12, ema_every=10)
        return train(data, NetworkConfig(width=4, steps=2), cfg, checkpoint=ckpt, log=log)[0]

    straight = run(30, tmp_path / "a.ckpt")

    def interrupt_at_21(message):
        if message.startswith("iter 21/"):
            os.kill(os.getpid(), signal.SIGTERM)
    with pytest.raises(TrainingInterrupted, match=r"interrupted at iteration 21; .*b.ckpt holds the run so far") \
            as stopped:
        run(30, tmp_path / "b.ckpt", log=interrupt_at_21)
    assert stopped.value.signum == signal.SIGTERM  # `corediff train` exits 143 for it, as the others do
    assert torch.load(tmp_path / "b.ckpt", weights_only=True)["iteration"] == 21
    resumed = run(30, tmp_path / "b.ckpt")
    assert all(torch.equal(x, y) for x, y in zip(straight.state_dict().values(), resumed.state_dict().values()))
    other = [(v + 1, pairs[0][1] + 1)]
    with pytest.raises(CoreDiffError, match="made on other training data"):
        run(40, tmp_path / "b.ckpt", data=other)
    mixed = pairs + [(synthetic_ct(4, 48, seed=4), synthetic_ct(4, 48, seed=5))]
    ctx, tgt = PairedSlices(mixed, patch_size=0, seed=0).batch(6)  # 32 and 48 pixel slices
    assert ctx.shape == (6, 3, 32, 32) and tgt.shape == (6, 1, 32, 32)


def test_a_run_too_short_to_average_returns_its_trained_weights_not_the_initial_ones():
    v = synthetic_ct(4, 32, seed=3, noise_hu=5)
    pairs = [(v, v + 40 * np.random.default_rng(0).standard_normal(v.shape).astype(np.float32))]
    cfg = TrainConfig(iterations=5, batch_size=2, patch_size=16, ema_start=1, log_every=5)  # no EMA step (every 10)
    torch.manual_seed(0)
    initial = ClearNet(NetworkConfig(width=4, steps=2)).state_dict()
    ema, _ = train(pairs, NetworkConfig(width=4, steps=2), cfg, log=lambda m: None)
    assert not all(torch.equal(a, b) for a, b in zip(initial.values(), ema.state_dict().values()))


def test_patch_sampler_replicates_edges_and_pairs_context_with_target():
    ndct = synthetic_ct(1, 32, seed=0, noise_hu=0)
    data = PairedSlices([(ndct, ndct)], patch_size=16, seed=0)
    ctx, tgt = data.batch(3)
    assert ctx.shape == (3, 3, 16, 16) and tgt.shape == (3, 1, 16, 16)
    # single-slice volume: both neighbours are the slice itself, and LDCT == NDCT here
    assert torch.equal(ctx[:, 0], ctx[:, 1]) and torch.equal(ctx[:, 1], tgt[:, 0])


def test_patch_sampler_redraws_open_air_unless_asked_to_draw_anywhere():
    volume = np.full((1, 64, 64), -1000.0, np.float32)
    volume[:, :, :32] = 40.0  # a body on the left: 28 of 49 patch columns are > 30 % body
    share_with_body = {}
    for share in (0.0, 0.5, 1.0):
        data = PairedSlices([(volume, volume)], patch_size=16, seed=0, anywhere_share=share)
        _, tgt = data.batch(400)
        share_with_body[share] = float(((tgt > 0.2).float().mean(dim=(1, 2, 3)) > 0.3).float().mean())
    # anywhere: ~ 28 / 49 = 0.57 of the patches; re-drawn up to 10 times: 1 - 0.43^10 ~ 1
    assert 0.45 < share_with_body[1.0] < 0.7 and share_with_body[0.0] > 0.98
    assert share_with_body[1.0] < share_with_body[0.5] < share_with_body[0.0]
    with pytest.raises(CoreDiffError, match="anywhere"):
        PairedSlices([(volume, volume)], anywhere_share=1.5)


def test_patch_sampler_draws_neighbours_up_to_the_largest_gap_and_keeps_the_default_stream():
    # slice k holds the value 10 k HU everywhere: a neighbour's value says how far away it is
    volume = np.stack([np.full((16, 16), 10.0 * k, np.float32) for k in range(12)])
    gaps = []
    for ctx, tgt in [PairedSlices([(volume, volume)], patch_size=8, seed=s, max_neighbour_gap=4).batch(1)
                     for s in range(300)]:
        hu = ctx[0, :, 0, 0].numpy() * 4096.0 - 1024.0
        assert torch.equal(ctx[:, 1:2], tgt)  # LDCT == NDCT here: the centre is the target
        gaps.append(round(max(hu[2] - hu[1], hu[1] - hu[0]) / 10.0))
        if gaps[-1] > 1:  # both neighbours that far, on either side: no edge replicated (12 slices > 2 x 4)
            assert abs((hu[1] - hu[0]) - (hu[2] - hu[1])) < 0.5
    assert set(gaps) == {1, 2, 3, 4}
    short = volume[:5]  # too short for a gap of 3 on both sides: adjacent neighbours, as at inference
    for s in range(100):  # it gave contexts like slices (0, 1, 4): one side 1 away, the other 3
        hu = PairedSlices([(short, short)], patch_size=8, seed=s, max_neighbour_gap=3).batch(1)[0][0, :, 0, 0]
        k = [round(float(v) * 409.6 - 102.4) for v in hu]
        below, above = k[1] - k[0], k[2] - k[1]
        assert below == above or (below, above) in ((0, 1), (1, 0)), k  # 0: an edge slice replicated
    # the default is the adjacent slices, with the random stream of earlier runs
    a = PairedSlices([(volume, volume)], patch_size=8, seed=5).batch(20)
    b = PairedSlices([(volume, volume)], patch_size=8, seed=5, max_neighbour_gap=1).batch(20)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    for bad in (0, 2.5):
        with pytest.raises(CoreDiffError, match="neighbour gap"):
            PairedSlices([(volume, volume)], max_neighbour_gap=bad)


def test_the_patch_is_cut_to_a_multiple_of_four_for_slices_smaller_than_it():
    """Training on 62-px slices (patch 64, shrunk to the slice) crashed in CLEAR-Net's decoder."""
    volume = synthetic_ct(3, 62)
    assert PairedSlices([(volume, volume)], patch_size=64).patch == 60
    assert PairedSlices([(volume, volume)], patch_size=0).patch == 60  # whole slices, too
    assert PairedSlices([(volume, volume)], patch_size=0, multiple=1).patch == 62  # RED-CNN has no pooling
    net = ClearNet(NetworkConfig(width=8))
    ctx, tgt = PairedSlices([(volume, volume)], patch_size=64).batch(2)
    corediff_loss(net, NetworkConfig(width=8), ctx, tgt, t=5).backward()


def test_patch_sampler_gives_the_own_slice_as_context_to_its_share_of_patches():
    # slice k holds 10 k HU: a context of three equal values is the slice standing in for its neighbours
    volume = np.stack([np.full((16, 16), 10.0 * k, np.float32) for k in range(12)])
    own = {}
    for share in (0.0, 0.5, 1.0):
        ctx, tgt = PairedSlices([(volume, volume)], patch_size=8, seed=2, own_slice_share=share).batch(400)
        assert torch.equal(ctx[:, 1:2], tgt)
        alike = (ctx[:, 0, 0, 0] == ctx[:, 1, 0, 0]) & (ctx[:, 2, 0, 0] == ctx[:, 1, 0, 0])
        own[share] = float(alike.float().mean())
    # with real neighbours only the end slices (2 of 12, one edge replicated) have an equal neighbour, never two
    assert own[0.0] == 0.0 and own[1.0] == 1.0 and 0.42 < own[0.5] < 0.58
    a = PairedSlices([(volume, volume)], patch_size=8, seed=5).batch(20)  # the default keeps earlier runs' stream
    b = PairedSlices([(volume, volume)], patch_size=8, seed=5, own_slice_share=0.0).batch(20)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(CoreDiffError, match="own slice"):
            PairedSlices([(volume, volume)], own_slice_share=bad)


def test_clean_context_comes_from_the_same_draws_and_mirrors_only_the_neighbours_noise():
    ndct = synthetic_ct(4, 32, seed=0, noise_hu=0)
    ldct = ndct + np.random.default_rng(1).normal(0, 40, ndct.shape).astype(np.float32)
    ctx, tgt = PairedSlices([(ndct, ldct)], patch_size=16, seed=3).batch(6)
    ctx2, tgt2, clean = PairedSlices([(ndct, ldct)], patch_size=16, seed=3).batch_with_clean_context(6)
    assert torch.equal(ctx, ctx2) and torch.equal(tgt, tgt2) and torch.equal(clean[:, 1:2], tgt)
    mirrored = mirror_neighbour_noise(ctx, clean)
    assert torch.equal(mirrored[:, 1], ctx[:, 1])  # the centre slice keeps its noise
    for j in (0, 2):
        repeated = (ctx[:, j] == ctx[:, 1]).flatten(1).all(1)  # the volume's ends: the centre repeated
        assert torch.equal(mirrored[repeated, j], ctx[repeated, j])
        inner = ~repeated
        assert inner.any()
        # the neighbour's noise (LDCT - NDCT) is negated, its anatomy (the NDCT) kept
        assert torch.allclose(mirrored[inner, j] - clean[inner, j], clean[inner, j] - ctx[inner, j], atol=1e-6)
    assert torch.equal(ctx, ctx2)  # the input was not modified


def test_the_context_noise_term_penalises_only_the_response_to_the_neighbours_noise():
    torch.manual_seed(0)
    cfg = NetworkConfig(width=8)
    net = ClearNet(cfg)
    for p in net.parameters():  # a network that reads its inputs, not the zero-initialised identity
        p.data.normal_(0, 0.1)
    ctx, tgt = torch.rand(2, 3, 16, 16) * 0.1 + 0.22, torch.rand(2, 1, 16, 16) * 0.1 + 0.22
    terms = LossTerms(context_noise_weight=3.0)
    assert not terms.mse_only
    base = corediff_loss(net, cfg, ctx, tgt, t=0)
    # the same neighbours: nothing to respond to, the term is 0
    same = corediff_loss(net, cfg, ctx, tgt, 0, terms, ctx.clone())
    assert same.item() == pytest.approx(base.item(), rel=1e-6)
    other = ctx.clone()
    other[:, 0] += 0.01
    from CoreDiffLib.diffusion import network_input
    x_t = degrade(tgt, ctx[:, 1:2], alpha_schedule(10)[0])
    tb = torch.zeros(2, dtype=torch.long)
    response = 0.5 * (net(network_input(x_t, ctx, True), tb) - net(network_input(x_t, other, True), tb))
    expected = base.item() + 3.0 * response.pow(2).mean().item()
    with_term = corediff_loss(net, cfg, ctx, tgt, 0, terms, other)
    assert with_term.item() == pytest.approx(expected, rel=1e-5) and with_term.item() > base.item()
    # "air": only pixels whose NDCT is air count; this target is soft tissue (0.22-0.32 ~ -100..+300 HU)
    in_air_only = corediff_loss(net, cfg, ctx, tgt, 0, LossTerms(context_noise_weight=3.0,
                                                                 context_noise_region="air"), other)
    assert in_air_only.item() == pytest.approx(base.item(), rel=1e-6)
    air_tgt = torch.zeros_like(tgt)  # -1000 HU everywhere: the "air" term is the whole term
    assert corediff_loss(net, cfg, ctx, air_tgt, 0, LossTerms(context_noise_weight=3.0, context_noise_region="air"),
                         other).item() == pytest.approx(corediff_loss(net, cfg, ctx, air_tgt, 0, terms, other).item(),
                                                        rel=1e-6)
    with pytest.raises(CoreDiffError, match="context-noise region"):
        LossTerms(context_noise_weight=1.0, context_noise_region="lungs")
    term_only = with_term - base
    term_only.backward()
    assert float(net.enc1[0].weight.grad.abs().sum()) > 0  # the term alone trains the network
    with pytest.raises(CoreDiffError, match="mirrored"):
        corediff_loss(net, cfg, ctx, tgt, 0, terms)
    with pytest.raises(CoreDiffError, match="adjacent slices"):
        terms.check_network(NetworkConfig(width=8, use_context=False))
    with pytest.raises(CoreDiffError, match="--context-noise-weight"):
        LossTerms(context_noise_weight=-1.0)


def test_training_with_the_context_noise_term_runs_and_refuses_a_network_without_context():
    ndct = synthetic_ct(3, 24, seed=0, noise_hu=0)
    ldct = ndct + np.random.default_rng(1).normal(0, 40, ndct.shape).astype(np.float32)
    cfg = TrainConfig(iterations=4, batch_size=2, patch_size=16, log_every=2, context_noise_weight=2.0)
    logs: list[str] = []
    _, state = train([(ndct, ldct)], NetworkConfig(width=8), cfg, log=logs.append)
    assert state.iteration == 4 and any("extra terms" in m for m in logs)
    with pytest.raises(CoreDiffError, match="adjacent slices"):
        train([(ndct, ldct)], NetworkConfig(width=8, use_context=False), cfg, log=lambda m: None)


@pytest.mark.parametrize("width,factor", [(8, 2), (4, 2), (8, 4)])
def test_a_widened_network_computes_the_same_function_and_its_copies_can_diverge(width, factor):
    torch.manual_seed(0)
    net = ClearNet(NetworkConfig(width=width))
    for p in net.parameters():  # a trained-looking network, not the zero-initialised identity
        p.data.normal_(0, 0.1)
    wide = widened(net.eval(), factor, seed=1)
    assert wide.config.width == width * factor and not wide.training
    assert count_parameters(wide) > 2 * count_parameters(net)
    stack = torch.rand(2, 3, 16, 16) * 0.1 + 0.22
    narrow_steps, wide_steps = sample(net, stack).steps, sample(wide, stack).steps  # EMM on after step 1
    assert float((narrow_steps - wide_steps).abs().max()) * 4096 < 1e-2  # HU
    loss = corediff_loss(wide.train(), wide.config, stack, stack[:, 1:2] * 0.9, t=5)
    loss.backward()
    g = wide.enc1[0].weight.grad  # copies of one channel read by layers that split them unevenly
    assert not torch.allclose(g[:width], g[width:2 * width])
    with pytest.raises(CoreDiffError, match="integer >= 2"):
        widened(net, 1)
    with pytest.raises(CoreDiffError, match="cannot widen"):
        widened(ClearNet(NetworkConfig(width=6)), 2)  # its EMM (4 channels) cannot grow to 6


@pytest.mark.parametrize("cfg", [NetworkConfig(width=8, use_context=False), NetworkConfig(width=8, use_emm=False)])
def test_ablations_train_and_sample(cfg):
    torch.manual_seed(0)
    net = ClearNet(cfg)
    ctx, tgt = torch.rand(2, 3, 16, 16), torch.rand(2, 1, 16, 16)
    loss = corediff_loss(net, cfg, ctx, tgt, t=5)
    loss.backward()
    assert torch.isfinite(loss)
    stack = ctx if cfg.use_context else ctx[:, 1:2]
    assert sample(net.eval(), stack).steps.shape == (10, 2, 1, 16, 16)


def test_a_time_limit_stops_training_early_and_still_checkpoints(tmp_path):
    v = synthetic_ct(4, 32, seed=3, noise_hu=5)
    pairs = [(v, v + 40 * np.random.default_rng(0).standard_normal(v.shape).astype(np.float32))]
    ckpt = tmp_path / "c.ckpt"
    cfg = TrainConfig(iterations=10**9, batch_size=2, patch_size=32, log_every=5, checkpoint_every=10**6,
                      time_limit_s=1.0)
    _, state = train(pairs, NetworkConfig(width=8), cfg, checkpoint=ckpt, log=lambda m: None)
    assert 0 < state.iteration < 10**9
    saved = torch.load(ckpt, weights_only=True)
    assert saved["iteration"] == state.iteration  # the stopping point is resumable


def test_late_time_sampling_trains_the_ldct_end_more_often(tmp_path, monkeypatch):
    from CoreDiffLib.training import time_index_probabilities
    assert time_index_probabilities(10, "uniform") is None
    p = time_index_probabilities(10, "late")
    assert p.sum() == pytest.approx(1.0) and np.all(np.diff(p) > 0)
    assert p[-1] == pytest.approx(10 / 55)  # the 1-step sampler's state: 18 % instead of 10 %
    with pytest.raises(CoreDiffError, match="uniform or late"):
        time_index_probabilities(10, "early")
    v = synthetic_ct(4, 32, seed=5, noise_hu=5)
    pairs = [(v, v + 40 * np.random.default_rng(2).standard_normal(v.shape).astype(np.float32))]
    monkeypatch.setenv("COREDIFF_DDP_DEBUG_DIR", str(tmp_path))  # records the t of every iteration
    cfg = TrainConfig(iterations=400, batch_size=1, patch_size=16, log_every=100, t_sampling="late")
    train(pairs, NetworkConfig(width=4), cfg, log=lambda m: None)
    ts = np.array(json.loads((tmp_path / "rank0.json").read_text())["ts"])
    assert (ts >= 5).mean() > 0.62  # 40/55 = 0.73 expected; uniform would give 0.5


def test_bf16_autocast_training_runs_and_keeps_fp32_weights():
    v = synthetic_ct(4, 32, seed=4, noise_hu=5)
    pairs = [(v, v + 40 * np.random.default_rng(1).standard_normal(v.shape).astype(np.float32))]
    cfg = TrainConfig(iterations=6, batch_size=2, patch_size=32, log_every=3, precision="bf16")
    ema, state = train(pairs, NetworkConfig(width=8), cfg, log=lambda m: None)
    assert state.iteration == 6 and all(np.isfinite(state.losses))
    assert all(p.dtype == torch.float32 for p in ema.parameters())
    cfg = TrainConfig(iterations=1)
    cfg.precision = "fp16"  # changed after it was made: train() checks it again, before any step
    with pytest.raises(CoreDiffError, match="--precision 'fp16': give one of fp32, bf16"):
        train(pairs, NetworkConfig(width=8), cfg, log=lambda m: None)


def test_training_and_inference_import_without_simpleitk():
    """GPU servers often lack SimpleITK: only file I/O may need it."""
    import subprocess
    import sys
    code = ("import sys; sys.modules['SimpleITK'] = None\n"
            "import CoreDiffLib.training, CoreDiffLib.inference, CoreDiffLib.benchmark, CoreDiffLib.metrics\n"
            "from CoreDiffLib.inference import Denoiser\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, encoding="utf-8")
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_resuming_a_finished_cosine_run_uses_the_new_learning_rate(tmp_path):
    v = synthetic_ct(4, 32, seed=5, noise_hu=5)
    pairs = [(v, v + 40 * np.random.default_rng(2).standard_normal(v.shape).astype(np.float32))]
    ckpt = tmp_path / "c.ckpt"
    told = []  # a cosine run told its progress (a float once replaced the callback: TypeError)
    train(pairs, NetworkConfig(width=8), TrainConfig(iterations=4, batch_size=2, patch_size=32, log_every=2,
                                                     lr_schedule="cosine"), checkpoint=ckpt, log=lambda m: None,
          progress=lambda done, total: told.append((done, total)))
    assert told[0] == (0, 4) and told[-1] == (4, 4)
    assert torch.load(ckpt, weights_only=True)["optimizer"]["param_groups"][0]["lr"] < 2e-4 / 5  # decayed
    train(pairs, NetworkConfig(width=8), TrainConfig(iterations=6, batch_size=2, patch_size=32, log_every=2,
                                                     lr=3e-4), checkpoint=ckpt, log=lambda m: None)
    assert torch.load(ckpt, weights_only=True)["optimizer"]["param_groups"][0]["lr"] == 3e-4


def test_ssim_splits_into_a_luminance_and_a_contrast_structure_factor():
    """Their product is scikit-image's SSIM map; a pure level shift in the air lands in luminance."""
    air = np.full((1, 64, 64), -1000.0, np.float32) + np.random.default_rng(4).normal(0, 10, (1, 64, 64)).astype(np.float32)
    shifted = air + 2.0  # 2 HU brighter, same texture
    lum, cs = ssim_terms(shifted[0], air[0])
    np.testing.assert_allclose(lum * cs, ssim_map(shifted[0], air[0]), atol=1e-6)
    assert lum.shape == ssim_map(shifted[0], air[0]).shape
    # clipping at -1000 HU makes the shifted image's texture differ a little too, but the level
    # is what costs: the luminance loss dwarfs the contrast-structure loss
    assert 1 - lum.mean() > 3 * (1 - cs.mean()) > 0


def test_the_level_term_weighs_local_level_errors_and_leaves_zero_mean_texture_to_the_mse():
    target = torch.rand(2, 1, 64, 64) * 0.1 + 0.2
    offset = target + 1e-3  # the same image, a constant level off
    mse = float(torch.mean((offset - target) ** 2))
    assert float(restoration_loss(offset, target, LossTerms(level_weight=10.0))) == pytest.approx(11 * mse, rel=1e-4)
    # a ±e checkerboard averages to zero over every 8x8 block: the term adds nothing
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    textured = target + 1e-3 * ((yy + xx) % 2 * 2 - 1).float()
    assert float(restoration_loss(textured, target, LossTerms(level_weight=10.0))) == pytest.approx(
        float(restoration_loss(textured, target)), rel=1e-4)
    # patches that are not a multiple of the block still count every pixel
    odd = target[..., :60, :60]
    assert float(restoration_loss(odd + 1e-3, odd, LossTerms(level_weight=10.0))) == pytest.approx(11e-6, rel=1e-3)


def test_the_ssim_window_level_term_compares_ssims_own_local_means():
    target = torch.rand(2, 1, 48, 48) * 0.1 + 0.2
    mse = 1e-6  # a constant 1e-3 offset: its local means are off by the same everywhere
    assert float(restoration_loss(target + 1e-3, target, LossTerms(level_weight=10.0, level_window="ssim"))) == \
        pytest.approx(11 * mse, rel=1e-3)
    # the window is the metric's own: the same local means as metrics.ssim_local_mean, inside the image
    image = np.random.default_rng(5).random((40, 40))
    torch_means = ssim_window_mean(torch.tensor(image)[None, None])[0, 0].numpy()
    np.testing.assert_allclose(torch_means, ssim_local_mean(image)[5:-5, 5:-5], atol=1e-12)
    # fine texture averages out in a sigma-1.5 window far more than a level error does
    yy, xx = torch.meshgrid(torch.arange(48), torch.arange(48), indexing="ij")
    textured = target + 1e-3 * ((yy + xx) % 2 * 2 - 1).float()
    extra = float(restoration_loss(textured, target, LossTerms(level_weight=10.0, level_window="ssim"))) - mse
    assert abs(extra) < 0.01 * 10 * mse
    with pytest.raises(ValueError, match="level window"):
        local_level(target, "blocks")


def test_loss_terms_refuse_what_the_loss_could_not_compute_before_any_training():
    from CoreDiffLib import CoreDiffError
    assert MSE_ONLY.mse_only and not LossTerms(level_weight=1.0).mse_only
    for bad, message in (({"level_window": "blocks"}, "level window"), ({"ssim_weight": -1.0}, "--ssim-weight"),
                         ({"level_weight": float("nan")}, "--level-weight")):
        with pytest.raises(CoreDiffError, match=message):
            LossTerms(**bad)
    with pytest.raises(CoreDiffError, match="--patch-size 11"):
        LossTerms(level_weight=1.0, level_window="ssim").check_patch_size(8)
    LossTerms(level_weight=1.0, level_window="ssim").check_patch_size(0)  # whole slices
    LossTerms(level_weight=1.0).check_patch_size(8)  # 8x8 blocks fit
    with pytest.raises(CoreDiffError, match="--ssim-weight"):  # a training config refuses it when made
        TrainConfig(ssim_weight=-1.0)
    with pytest.raises(CoreDiffError, match="--patch-size 11"):
        TrainConfig(level_weight=1.0, level_window="ssim", patch_size=8)


@pytest.mark.parametrize("field, value, message", [
    ("iterations", 0, "--iterations 0"), ("batch_size", 2.5, "--batch-size 2.5"),
    ("checkpoint_every", 0, "--checkpoint-every"), ("log_every", float("nan"), "log_every nan"),
    ("ema_start", -1, "--ema-start"), ("threads", -2, "--threads"), ("keep_every", float("inf"), "--keep-every"),
    ("patch_size", -8, "--patch-size -8"), ("patch_size", 30, "--patch-size 30: give a multiple of 4"),
    ("patch_size", 4, "at least 8"), ("lr", 0.0, "--lr 0"), ("lr", float("nan"), "--lr nan"),
    ("ema_decay", 1.0, "ema_decay"), ("time_limit_s", -60.0, "--time-limit -1 min"),
    ("lr_schedule", "step", "--lr-schedule 'step'"), ("t_sampling", "early", "--t-sampling"),
    ("precision", "fp16", "--precision"), ("anywhere_share", 1.5, "--anywhere-share 1.5"),
    ("own_slice_share", float("nan"), "--own-slice-share nan"), ("max_neighbour_gap", 0, "--max-neighbour-gap 0"),
    ("level_window", "blocks", "level window"), ("context_noise_weight", -1.0, "--context-noise-weight"),
])
def test_training_config_refuses_each_field_out_of_range_naming_its_option(field, value, message):
    with pytest.raises(CoreDiffError, match=re.escape(message)):
        TrainConfig(**{field: value})
    TrainConfig(**{field: getattr(TrainConfig(), field)})  # the default is fine


def test_training_with_its_own_thread_count_leaves_the_process_as_it_found_it():
    """train(threads=1) left the whole process (a notebook, the test run) on one thread."""
    from CoreDiffLib.training import train
    before = torch.get_num_threads()
    volume = synthetic_ct(3, 32)
    train([(volume, volume)], NetworkConfig(width=4), TrainConfig(iterations=1, batch_size=1, patch_size=16,
                                                                  threads=1, log_every=1), log=lambda m: None)
    assert torch.get_num_threads() == before


def test_a_denoiser_leaves_torchs_thread_count_as_it_found_it():
    """Denoiser(threads=1) set the whole process to one thread for good, and the next Denoiser
    took that as its default."""
    from CoreDiffLib.inference import Denoiser, denoise_volume
    from CoreDiffLib.runtime import physical_cores
    before = torch.get_num_threads()
    one = Denoiser.load(ClearNet(NetworkConfig(width=4)), "cpu", runtime="eager", threads=1)
    denoise_volume(synthetic_ct(2, 32), denoiser=one)
    assert torch.get_num_threads() == before
    default = Denoiser.load(ClearNet(NetworkConfig(width=4)), "cpu", runtime="eager")
    assert default.threads == min(before, physical_cores())


@pytest.mark.parametrize("orientation,storage", [
    ((0, 1, 0, 0, 0, -1), "sagittal"),   # DICOM ImageOrientationPatient of a sagittal reformat
    ((1, 0, 0, 0, 0, -1), "coronal"),
])
def test_a_reformat_is_named_by_its_slices_plane(orientation, storage):
    from CoreDiffLib.orientation import axial_layout
    row, col = np.array(orientation[:3], float), np.array(orientation[3:], float)
    direction = np.stack([row, col, np.cross(row, col)], axis=1).ravel()  # ITK: columns are index axes
    assert axial_layout(tuple(direction), (40, 64, 64)).storage == storage


def test_sigterm_during_the_final_moves_waits_for_them_then_ends_the_run_as_its_handler_says():
    """A cancel (SIGTERM) between two of a simulation's final renames left the new NDCT beside
    the earlier run's LDCT; now the moves finish and the handler runs after them."""
    import os
    import signal

    from CoreDiffLib.atomic import deferred_interrupts

    def terminate(signum, frame):
        raise SystemExit(128 + signum)
    previous = signal.signal(signal.SIGTERM, terminate)
    moved = []
    try:
        with pytest.raises(SystemExit) as stopped:
            with deferred_interrupts():
                moved.append(1)
                os.kill(os.getpid(), signal.SIGTERM)
                moved.append(2)  # still runs: the signal waits for the block's end
        assert moved == [1, 2] and stopped.value.code == 128 + signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is terminate
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_ctrl_c_held_during_the_final_moves_says_the_output_is_complete(tmp_path):
    """It was reported as "interrupted; no output was written" of an output that was in place."""
    import os
    import signal

    from CoreDiffLib.atomic import deferred_interrupts
    from CoreDiffLib.cli import _run

    def write_then_ctrl_c(args):
        with deferred_interrupts(str(tmp_path / "v.mhd")):
            os.kill(os.getpid(), signal.SIGINT)
            (tmp_path / "v.mhd").write_text("header")
        return 0
    import argparse
    import contextlib
    import io
    err = io.StringIO()
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own (a job run with & ignores it)
    try:
        with contextlib.redirect_stderr(err):
            assert _run(argparse.Namespace(func=write_then_ctrl_c)) == 130
    finally:
        signal.signal(signal.SIGINT, previous)
    assert (tmp_path / "v.mhd").read_text() == "header"
    assert f"interrupted once {tmp_path / 'v.mhd'} was in place: it is complete" in err.getvalue()
    assert "no output was written" not in err.getvalue()


def test_a_run_started_with_ctrl_c_ignored_keeps_ignoring_it():
    """A job started with `cmd &` from a script ignores SIGINT; the training's handler replaced that."""
    import signal

    from CoreDiffLib.atomic import StopRequests, deferred_interrupts
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with deferred_interrupts():  # the simulation's final moves keep ignoring it too
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        with StopRequests():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL  # SIGTERM still ends it cleanly
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_diverged_run_stops_without_replacing_its_checkpoint_or_writing_weights(tmp_path):
    """A too-high --lr (allowed on resume) trained on to the end with NaN losses, then replaced
    the good checkpoint and --out with weights nothing could use."""
    from CoreDiffLib.models import save_weights
    from CoreDiffLib.training import TrainingDiverged
    v = synthetic_ct(4, 32, seed=3, noise_hu=5)
    pairs = [(v, v + 40 * np.random.default_rng(0).standard_normal(v.shape).astype(np.float32))]
    ckpt = tmp_path / "c.ckpt"

    def run(iterations, lr):
        cfg = TrainConfig(iterations=iterations, batch_size=2, patch_size=16, log_every=5, checkpoint_every=5, lr=lr)
        return train(pairs, NetworkConfig(width=4, steps=2), cfg, checkpoint=ckpt, log=lambda m: None)[0]
    good = run(10, 2e-4)
    before = ckpt.read_bytes()
    with pytest.raises(TrainingDiverged, match="diverged by iteration .*/c.ckpt keeps the run as of its last save"):
        run(200, 1e12)
    assert ckpt.read_bytes() == before
    fresh = tmp_path / "fresh.ckpt"  # diverging before its first save, with snapshots asked for
    cfg = TrainConfig(iterations=60, batch_size=2, patch_size=16, log_every=20, checkpoint_every=20, keep_every=1,
                      lr=1e12)
    with pytest.raises(TrainingDiverged, match="stopped without saving; (nothing was saved|its last snapshot is .*"
                                               "fresh.it1.ckpt \\(resume from it)"):
        train(pairs, NetworkConfig(width=4, steps=2), cfg, checkpoint=fresh, log=lambda m: None)
    snapshots = sorted(tmp_path.glob("fresh.it*.ckpt"))
    assert not fresh.exists() and all(
        all(torch.isfinite(v).all() for v in torch.load(p, weights_only=True)["model"].values()) for p in snapshots)
    with torch.no_grad():
        next(good.parameters()).fill_(float("nan"))
    with pytest.raises(CoreDiffError, match="hold NaN or infinite values"):
        save_weights(good, tmp_path / "nan.safetensors")
    assert not (tmp_path / "nan.safetensors").exists()


def test_training_on_pairs_it_may_consume_converts_them_in_place_and_trains_the_same(tmp_path):
    """`corediff train` held each volume twice (HU and the network's range): 931 -> 650 MB peak
    for a 96 x 512² pair. Converting in place must not change the run or its data fingerprint."""
    v = synthetic_ct(4, 32, seed=3, noise_hu=5)
    noisy = v + 40 * np.random.default_rng(0).standard_normal(v.shape).astype(np.float32)
    cfg = TrainConfig(iterations=6, batch_size=2, patch_size=16, log_every=3, checkpoint_every=3)
    kept, _ = train([(v, noisy)], NetworkConfig(width=4, steps=2), cfg, checkpoint=tmp_path / "a.ckpt",
                    log=lambda m: None)
    pair = (v.copy(), noisy.copy())
    consumed, _ = train([pair], NetworkConfig(width=4, steps=2), cfg, checkpoint=tmp_path / "b.ckpt",
                        log=lambda m: None, consume_pairs=True)
    assert all(torch.equal(a, b) for a, b in zip(kept.state_dict().values(), consumed.state_dict().values()))
    assert torch.load(tmp_path / "a.ckpt", weights_only=True)["data"] == \
        torch.load(tmp_path / "b.ckpt", weights_only=True)["data"]
    assert pair[0].max() <= 1.0 and np.array_equal(v, synthetic_ct(4, 32, seed=3, noise_hu=5))  # only the given copy


def test_psnr_and_rmse_are_the_papers_on_the_window_of_minus_1000_to_1000_hu():
    """PSNR (the headline number) on [-1000, 1000] HU: a 2,000 HU range, so an error of 10 HU
    everywhere is 20 log10(2000 / 10) = 46.02 dB; values outside the window are clipped first."""
    from CoreDiffLib.metrics import psnr, rmse_hu
    ref = np.zeros((32, 32))
    assert psnr(ref + 10.0, ref) == pytest.approx(20 * np.log10(2000 / 10))
    assert rmse_hu(ref + 10.0, ref) == pytest.approx(10.0)
    assert psnr(ref, ref) == float("inf")
    bone = np.full((32, 32), 1500.0)
    assert psnr(bone + 300.0, bone) == float("inf") and rmse_hu(bone + 300.0, bone) == 0.0  # both clip to 1000


def test_the_metrics_refuse_what_would_give_a_number_that_means_nothing():
    """numpy broadcast a slice against a volume (34.6 dB of nothing), scikit-image took a stack
    of 11+ slices for one 3-D image, and [0, 1]-normalised images scored ~116 dB."""
    from CoreDiffLib.metrics import psnr, rmse_hu, ssim, ssim_terms, volume_metrics
    rng = np.random.default_rng(0)
    volume = rng.normal(40.0, 20.0, (12, 32, 32))
    volume[:, :4] = -1000.0
    noisy = volume + rng.normal(0.0, 10.0, volume.shape)
    for metric in (psnr, rmse_hu, ssim):
        with pytest.raises(CoreDiffError, match=r"\(32, 32\) and its reference \(12, 32, 32\) differ in shape"):
            metric(noisy[0], volume)
        with pytest.raises(CoreDiffError, match=r"differ in shape"):
            metric(noisy[0], volume[0, :1])  # one row: numpy would broadcast it down the slice
    for metric in (ssim, ssim_terms):
        with pytest.raises(CoreDiffError, match="one 2-D slice.*volume_metrics"):
            metric(noisy, volume)
    unit = lambda hu: (hu + 1024.0) / 4096.0  # noqa: E731
    for metric in (psnr, rmse_hu, ssim):
        with pytest.raises(CoreDiffError, match="in HU.*within ±2"):
            metric(unit(noisy[0]), unit(volume[0]))
    with pytest.raises(CoreDiffError, match=r"\(slices, rows, cols\) volumes of one shape"):
        volume_metrics(noisy[0], volume[0])
    per_slice = volume_metrics(noisy, volume)  # what a volume is scored with: slice by slice
    assert [m.ssim for m in per_slice] == [ssim(a, b) for a, b in zip(noisy, volume)]
    assert psnr(noisy[0], volume[0]) == pytest.approx(20 * np.log10(2000 / 10), abs=0.5)


def test_volume_figures_are_means_and_hu_helpers_clip_both_types_alike():
    """mean_metrics and the torch branch of hu_to_unit were never pinned (a median, or no clamp
    on tensors, passed every test); the CT check's limit sits far above metal's HU."""
    from CoreDiffLib.intensity import validate_ct_array
    from CoreDiffLib.metrics import SliceMetrics, mean_metrics
    m = mean_metrics([SliceMetrics(40.0, 0.90, 10.0), SliceMetrics(42.0, 0.95, 12.0), SliceMetrics(50.0, 0.99, 30.0)])
    assert (m.psnr, m.ssim, m.rmse_hu) == pytest.approx((44.0, 0.94666667, 17.3333333))
    hu = np.array([-3000.0, -1024.0, 0.0, 3072.0, 5000.0], np.float32)
    assert hu_to_unit(torch.from_numpy(hu)).tolist() == pytest.approx(hu_to_unit(hu).tolist())
    assert hu_to_unit(hu)[[0, -1]].tolist() == [0.0, 1.0]
    scan = np.full((1, 16, 16), -1000.0)
    scan[0, 8, 8] = 30000.0  # dense metal on an extended HU scale
    validate_ct_array(scan)
    scan[0, 8, 8] = 50000.0
    with pytest.raises(CoreDiffError, match="far beyond CT's HU range"):
        validate_ct_array(scan)


def test_pairs_that_share_memory_are_not_converted_in_place_twice():
    """One NDCT for two doses (the same array in two pairs): converting in place would convert it
    twice and squash the targets to 0.25."""
    nd = np.full((3, 64, 64), 40.0, np.float32)
    nd[:, :5] = -1000.0
    data = PairedSlices([(nd, nd + 30), (nd, nd + 60)], 32, in_place=True)
    assert data.pairs[0][0].max() == pytest.approx((40.0 + 1024) / 4096)
    assert nd.max() == 40.0  # left as HU: the conversion made copies


def test_a_checkpoint_from_before_legs_were_recorded_says_so_in_the_weights():
    from CoreDiffLib.training import TrainConfig, _unrecorded_legs
    from dataclasses import asdict
    legs = _unrecorded_legs({"train_config": asdict(TrainConfig(lr=5e-4)), "iteration": 300})
    assert len(legs) == 1 and legs[0]["from_iteration"] == 0 and legs[0]["to_iteration"] == 300
    assert legs[0]["lr"] == 5e-4 and "not recorded separately" in legs[0]["note"]


def test_every_storage_of_a_volume_gives_planes_of_one_height_and_back_the_same_array():
    """All 48 axis-aligned directions: the axial view's planes each lie at one height, rows run
    posterior and columns to the patient's left (in-plane flips undone), and the way back returns
    the stored array (a wrong inverse permutation passed for the self-inverse ones)."""
    import itertools

    from CoreDiffLib.orientation import axial_layout, in_plane_view
    shape = (18, 20, 22)  # (k, j, i)
    k, j, i = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij")
    index = np.stack([i, j, k])  # ITK index order
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1, -1), repeat=3):
            d = np.zeros((3, 3))
            for axis, (row, sign) in enumerate(zip(perm, signs)):
                d[row, axis] = sign  # index axis `axis` runs along LPS axis `row`
            x, y, z = np.tensordot(d, index, axes=1)
            layout = axial_layout(d.ravel(), shape)
            if layout is None:  # axial already: turned in-plane only
                view = in_plane_view(d.ravel())
                planes = {name: view.to_lps(c) for name, c in (("x", x), ("y", y), ("z", z))}
                assert np.array_equal(view.from_lps(planes["x"]), x), (perm, signs)
            else:
                planes = {name: layout.to_axial(c) for name, c in (("x", x), ("y", y), ("z", z))}
                assert np.array_equal(layout.from_axial(planes["x"]), x), (perm, signs)
            assert np.ptp(planes["z"], axis=(1, 2)).max() == 0, (perm, signs)  # one height per plane
            assert (np.diff(planes["y"], axis=1) > 0).all() and (np.diff(planes["x"], axis=2) > 0).all(), (perm, signs)


def test_the_output_stays_in_range_and_an_odd_sized_slice_is_padded_by_its_edge():
    """An estimate past the HU range is clamped (1 = 3072 HU); a slice whose sides are not multiples of
    4 is padded with its edge pixels (not zeros: -1024 HU beside tissue), then cropped back."""
    x0 = torch.full((1, 1, 16, 16), 1.2)
    stack = torch.rand(1, 3, 16, 16)
    assert sample(OracleNet(x0).eval(), stack).final.max() <= 1.0

    class EdgeNet(ClearNet):
        """Records what it is given and returns its centre channel."""
        def __init__(self):
            super().__init__(NetworkConfig(width=8))
            self.seen = []

        def forward(self, x, t, x0_prev=None, xT=None):
            self.seen.append(x.clone())
            return x[:, 1:2]
    torch.manual_seed(0)
    odd = torch.rand(1, 3, 30, 34) * 0.5 + 0.25
    net = EdgeNet().eval()
    sample(net, odd, steps=1)
    padded = net.seen[0]
    assert padded.shape[-2:] == (32, 36)
    assert torch.equal(padded[..., 30:, :34], odd[..., 29:30, :].expand(-1, -1, 2, -1))  # the last row, repeated
    assert torch.equal(padded[..., :30, 34:], odd[..., :, 33:34].expand(-1, -1, -1, 2))


def test_a_blank_reference_is_judged_in_the_metric_window_and_the_paired_interval_is_students():
    from scipy import stats

    from CoreDiffLib.metrics import blank_in_window, paired_difference
    padding = np.full((8, 8), -3024.0)
    padding[:4] = -1200.0  # two padding values: one value once clipped to [-1000, 1000]
    assert blank_in_window(padding) and not blank_in_window(np.where(padding > -2000, -990.0, -1000.0))
    a = np.array([50.1, 49.7, 51.2, 50.4, 49.9])
    b = np.array([49.8, 49.9, 50.6, 50.0, 49.5])
    result = paired_difference(a, b)
    low, high = stats.t.interval(0.95, 4, loc=np.mean(a - b), scale=stats.sem(a - b))  # sample SD (ddof 1)
    assert (result.low, result.high) == pytest.approx((low, high))
    assert result.mean == pytest.approx(0.3) and result.a_better == 4 and result.n == 5
    assert paired_difference(a, np.where(a > 50.3, a, b)).a_better == 2  # a tie is no win


def _noisy_pair(seed: int = 3):
    v = synthetic_ct(4, 32, seed=seed, noise_hu=5)
    return [(v, v + 40 * np.random.default_rng(0).standard_normal(v.shape).astype(np.float32))]


def test_the_averaged_weights_average_from_ema_start_and_are_what_a_stopped_run_and_its_snapshots_keep(tmp_path):
    """From a mutation review: an EMA blended the wrong way round (the new weights at 99.5 %), an
    --ema-start ignored, the live weights kept as a stopped run's result, and --keep-every
    snapshots taken only at checkpoints all passed every test."""
    from CoreDiffLib.training import _update_ema, weights_at_stop
    torch.manual_seed(0)
    ema, model = ClearNet(NetworkConfig(width=4, steps=2)), ClearNet(NetworkConfig(width=4, steps=2))
    for p in list(ema.parameters()) + list(model.parameters()):
        p.data.normal_()
    before = [p.detach().clone() for p in ema.parameters()]
    _update_ema(ema, model, 0.9)
    for old, new, live in zip(before, ema.parameters(), model.parameters()):
        torch.testing.assert_close(new.detach(), 0.9 * old + 0.1 * live.detach())
    net = NetworkConfig(width=4, steps=2)
    late = TrainConfig(iterations=20, batch_size=2, patch_size=16, log_every=5, checkpoint_every=100, ema_start=20,
                       ema_every=1, keep_every=5)
    train(_noisy_pair(), net, late, checkpoint=tmp_path / "late.ckpt", log=lambda m: None)
    saved = torch.load(tmp_path / "late.ckpt", weights_only=True)
    assert all(torch.equal(saved["ema"][k], saved["model"][k]) for k in saved["model"])  # nothing averaged before 20
    assert sorted(p.name for p in tmp_path.glob("late.it*.ckpt")) == [f"late.it{n}.ckpt" for n in (10, 15, 20, 5)]
    averaged = TrainConfig(iterations=12, batch_size=2, patch_size=16, log_every=4, checkpoint_every=100, ema_start=0,
                           ema_every=1)
    returned, _ = train(_noisy_pair(), net, averaged, checkpoint=tmp_path / "avg.ckpt", log=lambda m: None)
    kept, state = weights_at_stop(tmp_path / "avg.ckpt", net)
    saved = torch.load(tmp_path / "avg.ckpt", weights_only=True)
    assert state.iteration == 12 and not all(torch.equal(saved["ema"][k], saved["model"][k]) for k in saved["model"])
    assert all(torch.equal(a, b) for a, b in zip(kept.state_dict().values(), returned.state_dict().values()))
    # stopped before the EMA averaged (Ctrl-C, a GPU session's machine taken back): the EMA is the
    # initial weights or a copy ema_every - 1 iterations old, so the live weights are what it kept
    early = TrainConfig(iterations=20, batch_size=2, patch_size=16, log_every=5, checkpoint_every=100, ema_start=30,
                        ema_every=10, keep_every=5)
    train(_noisy_pair(), net, early, checkpoint=tmp_path / "early.ckpt", log=lambda m: None)
    for n in (5, 15):
        saved = torch.load(tmp_path / f"early.it{n}.ckpt", weights_only=True)
        assert not all(torch.equal(saved["ema"][k], saved["model"][k]) for k in saved["model"])
        kept, _ = weights_at_stop(tmp_path / f"early.it{n}.ckpt", net)
        assert all(torch.equal(kept.state_dict()[k], saved["model"][k]) for k in saved["model"])


def _fake_training_clock(monkeypatch, seconds_per_reading: float) -> None:
    """training's time.time() as a clock that moves ``seconds_per_reading`` at each reading: a
    time limit then counts readings, whatever the machine's load."""
    import types

    from CoreDiffLib import training
    clock = [0.0]

    def tick() -> float:
        clock[0] += seconds_per_reading
        return clock[0]
    monkeypatch.setattr(training, "time", types.SimpleNamespace(time=tick, strftime=time.strftime,
                                                                gmtime=time.gmtime))


def test_a_time_limit_counts_every_leg_and_a_time_limited_cosine_lowers_the_learning_rate(tmp_path, monkeypatch):
    """A resumed run that forgot the time its earlier legs used got a fresh budget, and a
    time-limited cosine schedule started again at full --lr: no test resumed a timed run. On a
    clock that ticks 0.02 s per reading (on the real one a loaded machine's first iteration took
    the whole second, and the schedule had no time to lower the rate)."""
    _fake_training_clock(monkeypatch, 0.02)
    cfg = TrainConfig(iterations=10**6, batch_size=2, patch_size=16, log_every=1, checkpoint_every=10**6,
                      time_limit_s=1.0, lr_schedule="cosine", lr=1e-3)
    net = NetworkConfig(width=4, steps=2)
    _, first = train(_noisy_pair(), net, cfg, checkpoint=tmp_path / "t.ckpt", log=lambda m: None)
    saved = torch.load(tmp_path / "t.ckpt", weights_only=True)
    assert saved["elapsed_s"] >= 1.0
    assert saved["optimizer"]["param_groups"][0]["lr"] < 0.9 * cfg.lr  # the schedule ran on the clock
    logs = []
    _, again = train(_noisy_pair(), net, cfg, checkpoint=tmp_path / "t.ckpt", log=logs.append)
    assert again.iteration == first.iteration
    assert any(re.search(r", \d+ s of the 1 s time limit used", m) for m in logs), logs
    assert any("the --time-limit of 1 s (all legs together) is used up" in m for m in logs), logs


def test_a_leg_stopped_halfway_through_its_time_limit_goes_on_for_the_time_left(tmp_path, monkeypatch):
    """A run stopped before its --time-limit (its --iterations reached, or Ctrl-C) and resumed
    with the same limit trains for the time left, not for a fresh limit. On a clock that ticks
    once per reading, so that every leg's time is its own count of readings."""
    _fake_training_clock(monkeypatch, 1.0)

    def run(iterations, ckpt):
        cfg = TrainConfig(iterations=iterations, batch_size=1, patch_size=16, log_every=5, checkpoint_every=10**6,
                          time_limit_s=50.0)
        return train(_noisy_pair(), NetworkConfig(width=4, steps=2), cfg, checkpoint=tmp_path / ckpt,
                     log=lambda m: None)[1]

    whole = run(10**6, "whole.ckpt").iteration  # one leg, stopped by the limit
    assert 20 < whole < 50
    assert run(whole // 2, "legs.ckpt").iteration == whole // 2  # stopped halfway, by --iterations
    resumed = run(10**6, "legs.ckpt").iteration
    assert abs(resumed - whole) <= 3, (whole, resumed)  # a fresh limit: about 1.5 x whole
    assert torch.load(tmp_path / "legs.ckpt", weights_only=True)["elapsed_s"] == pytest.approx(50.0, abs=5.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here: runs on a GPU CI)")
def test_a_run_resumes_on_a_gpu(tmp_path):
    """The checkpoint was read onto the training device, and torch.set_rng_state takes only a CPU
    tensor: found by reading (a review without a GPU), so every resumed GPU run would have stopped."""
    def run(iterations):
        cfg = TrainConfig(iterations=iterations, batch_size=2, patch_size=16, log_every=5, checkpoint_every=5)
        return train(_noisy_pair(), NetworkConfig(width=4, steps=2), cfg, checkpoint=tmp_path / "gpu.ckpt",
                     device="cuda", log=lambda m: None)[1]
    run(5)
    assert run(10).iteration == 10


def test_uniform_time_sampling_trains_every_step_and_a_resume_before_ema_start_is_bit_for_bit(tmp_path, monkeypatch):
    """t = 0, the sampler's last step, never drawn; or the EMA switched on early when a run was
    resumed between --ema-start and the first EMA step after it: neither failed a test."""
    monkeypatch.setenv("COREDIFF_DDP_DEBUG_DIR", str(tmp_path))  # records the t of every iteration
    train(_noisy_pair(5), NetworkConfig(width=4), TrainConfig(iterations=200, batch_size=1, patch_size=16,
                                                              log_every=100), log=lambda m: None)
    ts = np.array(json.loads((tmp_path / "rank0.json").read_text())["ts"])
    assert sorted(set(ts.tolist())) == list(range(10))
    monkeypatch.delenv("COREDIFF_DDP_DEBUG_DIR")

    def run(iterations, ckpt, ema_start):
        cfg = TrainConfig(iterations=iterations, batch_size=2, patch_size=16, log_every=5, checkpoint_every=5,
                          ema_start=ema_start, ema_every=10)
        return train(_noisy_pair(), NetworkConfig(width=4, steps=2), cfg, checkpoint=ckpt, log=lambda m: None)[0]
    # past --ema-start 12, before the first EMA step at or after it (20); and --ema-start 20, an EMA
    # step itself (the defaults 2000 and 10 are so), resumed between it and the next
    for ema_start, stop in ((12, 15), (20, 25)):
        straight = run(30, tmp_path / f"a{ema_start}.ckpt", ema_start)
        run(stop, tmp_path / f"b{ema_start}.ckpt", ema_start)
        resumed = run(30, tmp_path / f"b{ema_start}.ckpt", ema_start)
        assert all(torch.equal(x, y) for x, y in zip(straight.state_dict().values(), resumed.state_dict().values()))


# ----------------------------------------------------------------------------- inference wiring
def test_context_stacks_hold_each_slice_between_its_neighbours_with_the_ends_replicated():
    """Slice n-1 got its lower neighbour twice (not itself) with every test passing: they compared
    the code with itself (whole run against parts, file against memory)."""
    from CoreDiffLib.inference import context_stack
    from CoreDiffLib.intensity import unit_to_hu
    volume = np.arange(5, dtype=np.float32)[:, None, None] * 100.0 + np.zeros((5, 2, 2), np.float32)
    stack = np.rint(unit_to_hu(context_stack(volume, 0, 5))[:, :, 0, 0] / 100.0).astype(int)
    assert stack.tolist() == [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 4]]
    part = np.rint(unit_to_hu(context_stack(volume, 3, 5))[:, :, 0, 0] / 100.0).astype(int)
    assert part.tolist() == [[2, 3, 4], [3, 4, 4]]
    alone = np.rint(unit_to_hu(context_stack(volume, 1, 3, neighbours=False))[:, :, 0, 0] / 100.0).astype(int)
    assert alone.tolist() == [[1, 1, 1], [2, 2, 2]]


def test_a_model_without_context_denoises_each_slice_itself():
    """A --no-context model given the previous slice instead of its own wrote that slice in its place."""
    from CoreDiffLib.inference import Denoiser, denoise_volume
    from CoreDiffLib.intensity import unit_to_hu
    torch.manual_seed(0)
    net = ClearNet(NetworkConfig(width=4, steps=3, use_context=False)).eval()
    volume = synthetic_ct(3, 32, seed=2) + np.arange(3)[:, None, None] * 200.0  # slices far apart
    out = denoise_volume(volume, denoiser=Denoiser(net, torch.device("cpu"), None, None, None, None))
    with torch.no_grad():
        alone = sample(net, torch.from_numpy(hu_to_unit(volume[1:2]))[:, None].float(), None).final[0, 0]
    np.testing.assert_allclose(out[1], unit_to_hu(alone.numpy()), atol=0.5)


def test_the_denoisers_settings_come_from_what_was_asked():
    """--no-channels-last was dropped on its way from the command line; steps other than T with an
    adaptation, an empty slice range and the 4 mm rule for neighbours each lacked a test."""
    import argparse

    from CoreDiffLib.cli import load_denoiser
    from CoreDiffLib.inference import THICK_SLICE_MM, Denoiser, check_slice_range, uses_neighbours
    torch.manual_seed(0)
    net = ClearNet(NetworkConfig(width=4, steps=3)).eval()
    for flag in (True, False):
        args = argparse.Namespace(model="corediff-25-w32", adaptation=None, device="cpu", steps=1, precision="fp32",
                                  channels_last=flag, progress="none", quiet=True)
        assert load_denoiser(args).settings.channels_last is flag
    with pytest.raises(CoreDiffError, match="a one-shot adaptation weighs all T steps"):
        Denoiser.load(net, "cpu", steps=1, adaptation=type("Blend", (), {"combine": lambda self, s: s[-1]})())
    with pytest.raises(CoreDiffError, match="slices 2:2 hold no slice: A:B means slices A to B-1"):
        check_slice_range((2, 2), 5)
    with pytest.raises(CoreDiffError, match="slices 4:6 are not within this volume's 0:5"):
        check_slice_range((4, 6), 5)
    assert THICK_SLICE_MM == 4.0 and uses_neighbours(3.9) and not uses_neighbours(4.0)
    assert uses_neighbours(6.0, trained_neighbour_mm=5.0) and not uses_neighbours(6.3, trained_neighbour_mm=5.0)
