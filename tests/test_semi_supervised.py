"""Semi-supervised components on tiny tensors; expected values are computed by hand in the comments."""

import io
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from nnunet_ext.semi_supervised import (
    EMATeacher,
    StrongIntensityPerturbation,
    axial_continuity_loss,
    cosine_decay,
    linear_warmup,
    sharpened_consistency_loss,
    sigmoid_rampup,
    unlabeled_mask,
)

ALL_OFF = dict(p_noise=0.0, p_brightness=0.0, p_contrast=0.0, p_gamma=0.0, p_blur=0.0)
ALL_ON = dict(p_noise=1.0, p_brightness=1.0, p_contrast=1.0, p_gamma=1.0, p_blur=1.0)


# ----------------------------------------------------------------------------------------------------------- EMA

class Tiny(nn.Module):
    """A parameter-holding layer and a BatchNorm with buffers (running_mean, running_var, num_batches_tracked)."""

    def __init__(self, track_running_stats: bool = True):
        super().__init__()
        self.linear = nn.Linear(2, 1)
        self.norm = nn.BatchNorm1d(1, track_running_stats=track_running_stats)

    def forward(self, x):
        return self.norm(self.linear(x))


@torch.no_grad()
def set_student(student: Tiny, param: float, running_mean: float, batches: int) -> None:
    for p in student.parameters():
        p.fill_(param)
    student.norm.running_mean.fill_(running_mean)
    student.norm.num_batches_tracked.fill_(batches)


def assert_teacher(ema: EMATeacher, param: float, running_mean: float, batches: int) -> None:
    for name, p in ema.module.named_parameters():
        assert torch.allclose(p, torch.full_like(p, param)), name
    assert torch.equal(ema.module.norm.running_mean, torch.tensor([running_mean]))
    assert ema.module.norm.num_batches_tracked.item() == batches


def test_ema_update_sequence_by_hand():
    student = Tiny()
    ema = EMATeacher(student, alpha=0.7)
    # (student params, running_mean, num_batches_tracked) -> (alpha_t, teacher params):
    #   step 0: alpha_0 = min(1 - 1/1, 0.7) = 0    -> teacher = 1 (the student)
    #   step 1: alpha_1 = min(1 - 1/2, 0.7) = 1/2  -> 1/2 * 1   + 1/2 * 4  = 2.5
    #   step 2: alpha_2 = min(1 - 1/3, 0.7) = 2/3  -> 2/3 * 2.5 + 1/3 * 7  = 5/3 + 7/3 = 4
    #   step 3: alpha_3 = min(1 - 1/4, 0.7) = 0.7  -> 0.7 * 4   + 0.3 * 14 = 2.8 + 4.2 = 7
    # Buffers are copied, never averaged.
    table = [
        ((1.0, 10.0, 3), (0.0, 1.0)),
        ((4.0, -2.0, 4), (1 / 2, 2.5)),
        ((7.0, 0.5, 5), (2 / 3, 4.0)),
        ((14.0, 6.0, 6), (0.7, 7.0)),
    ]
    for step, ((param, running_mean, batches), (alpha_t, teacher)) in enumerate(table):
        set_student(student, param, running_mean, batches)
        assert ema.update(student) == pytest.approx(alpha_t)
        assert ema.step == step + 1
        assert_teacher(ema, teacher, running_mean, batches)


def test_ema_first_update_makes_teacher_the_student_exactly():
    torch.manual_seed(0)
    student = Tiny()
    ema = EMATeacher(student)
    with torch.no_grad():
        for p in student.parameters():
            p.normal_()
    ema.update(student)
    for (name, t), s in zip(ema.module.state_dict().items(), student.state_dict().values()):
        assert torch.equal(t, s), name


def test_ema_is_a_deep_copy_without_gradients():
    student = Tiny()
    set_student(student, 1.0, 0.0, 0)
    ema = EMATeacher(student)
    set_student(student, 5.0, 3.0, 2)
    assert_teacher(ema, 1.0, 0.0, 0)  # changing the student does not touch the teacher before update
    x = torch.randn(4, 2)
    student(x).square().mean().backward()
    assert all(p.grad is not None for p in student.parameters())
    assert EMATeacher(student).module.linear.weight.grad is None  # deepcopy would have copied .grad

    ema.update(student)
    assert all(not p.requires_grad and p.grad is None for p in ema.module.parameters())
    out = ema.module(x)
    assert not out.requires_grad


def test_ema_unwraps_dataparallel():
    ema = EMATeacher(nn.DataParallel(Tiny()))
    assert isinstance(ema.module, Tiny)
    ema.update(nn.DataParallel(Tiny()))  # wrapper names ("module.") do not count as a mismatch


def test_ema_state_dict_round_trip_continues_the_alpha_sequence():
    student = Tiny()
    ema = EMATeacher(student, alpha=0.7)
    for param in (1.0, 4.0):
        set_student(student, param, 0.0, 0)
        ema.update(student)
    buffer = io.BytesIO()
    torch.save(ema.state_dict(), buffer)
    buffer.seek(0)
    resumed = EMATeacher(Tiny(), alpha=0.1)
    resumed.load_state_dict(torch.load(buffer))
    assert (resumed.step, resumed.alpha) == (2, 0.7)
    assert_teacher(resumed, 2.5, 0.0, 0)
    # Third update on both: alpha_2 = 2/3, teacher 2/3 * 2.5 + 1/3 * 7 = 4.
    set_student(student, 7.0, 0.0, 0)
    assert ema.update(student) == resumed.update(student) == pytest.approx(2 / 3)
    assert_teacher(resumed, 4.0, 0.0, 0)


@pytest.mark.parametrize("other", [
    nn.Linear(2, 1),                         # parameter names differ
    Tiny(track_running_stats=False),         # same parameters, no buffers
    nn.Sequential(),                         # nothing at all
], ids=["params", "buffers", "empty"])
def test_ema_mismatched_student_raises_and_leaves_teacher_unchanged(other):
    student = Tiny()
    set_student(student, 1.0, 2.0, 3)
    ema = EMATeacher(student)
    with pytest.raises(ValueError, match="names differ"):
        ema.update(other)
    assert ema.step == 0
    assert_teacher(ema, 1.0, 2.0, 3)


def test_ema_mismatched_shape_raises():
    ema = EMATeacher(nn.Linear(2, 1))
    with pytest.raises(ValueError, match="shape"):
        ema.update(nn.Linear(3, 1))


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_ema_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha"):
        EMATeacher(Tiny(), alpha=alpha)


def _ddp_worker(rank: int, world_size: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)  # same initial student on both ranks (DDP would broadcast rank 0's anyway)
        model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
        ddp = nn.parallel.DistributedDataParallel(model)
        ema = EMATeacher(ddp.module)  # after wrapping, from .module
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
        data = torch.Generator().manual_seed(100 + rank)  # each rank its own data
        students = []
        for _ in range(3):
            loss = ddp(torch.randn(4, 2, generator=data)).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            ema.update(ddp.module)
            students.append({k: v.clone() for k, v in ddp.module.state_dict().items()})
        torch.save({"students": students, "teacher": ema.module.state_dict()}, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed + gloo")
def test_ema_identical_on_ddp_ranks(tmp_path):
    # forkserver instead of mp.spawn: the server imports torch and torch._dynamo (which DDP imports) once for both
    # ranks, and its children skip interpreter teardown; spawn takes ~14 s here, this ~4 s. Unlike a plain fork it
    # does not copy this (possibly multi-threaded) pytest process.
    mp.get_context("forkserver").set_forkserver_preload(["torch._dynamo", __name__])
    mp.start_processes(_ddp_worker, args=(2, str(tmp_path)), nprocs=2, join=True, start_method="forkserver")
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    s1, s2, s3 = results[0]["students"]
    for rank, result in enumerate(results):
        teacher = result["teacher"]
        for name in dict(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).named_parameters()):
            # DDP averages gradients, so the students agree across ranks ...
            assert torch.allclose(result["students"][2][name], s3[name]), (rank, name)
            # ... and alpha 0, 1/2, 2/3 give t1 = s1, t2 = (s1 + s2) / 2, t3 = 2/3 t2 + 1/3 s3 = (s1 + s2 + s3) / 3.
            assert torch.allclose(teacher[name], (s1[name] + s2[name] + s3[name]) / 3, atol=1e-6), (rank, name)
        # BatchNorm statistics come from each rank's own batch; the teacher takes rank 0's on both ranks.
        for name in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
            assert torch.equal(teacher[name], s3[name]), (rank, name)
    assert not torch.equal(results[1]["students"][2]["1.running_mean"], s3["1.running_mean"])
    for name, value in results[0]["teacher"].items():
        assert torch.equal(value, results[1]["teacher"][name]), name


# ------------------------------------------------------------------------------------------------------- ramp-ups

@pytest.mark.parametrize("progress, length, expected", [
    (0, 10, math.exp(-5)),          # t = 0: exp(-5 * 1^2)
    (-3, 10, math.exp(-5)),         # clipped to t = 0
    (5, 10, math.exp(-1.25)),       # t = 1/2: exp(-5 * 1/4)
    (0.25, 0.5, math.exp(-1.25)),   # fractions of training work the same way
    (10, 10, 1.0),
    (20, 10, 1.0),                  # clipped to t = 1
    (3, 0, 1.0),                    # no ramp-up
    (0, -1, 1.0),
])
def test_sigmoid_rampup(progress, length, expected):
    assert sigmoid_rampup(progress, length) == pytest.approx(expected)


@pytest.mark.parametrize("progress, expected", [
    (0.0, 0.0),
    (0.05, 0.0),
    (0.125, 0.5),   # (0.125 - 0.05) / (0.2 - 0.05) = 0.075 / 0.15
    (0.2, 1.0),
    (0.3, 1.0),
])
def test_linear_warmup(progress, expected):
    assert linear_warmup(progress, 0.05, 0.2) == pytest.approx(expected)


@pytest.mark.parametrize("start, end", [(0.2, 0.2), (0.3, 0.2)])
def test_linear_warmup_needs_start_before_end(start, end):
    with pytest.raises(ValueError, match="start < end"):
        linear_warmup(0.1, start, end)


@pytest.mark.parametrize("progress, expected", [
    (0, 1.0),
    (1, (1 + math.sqrt(0.5)) / 2),  # t = 1/4: (1 + cos(pi / 4)) / 2
    (2, 0.5),                       # t = 1/2: cos(pi / 2) = 0
    (3, (1 - math.sqrt(0.5)) / 2),
    (4, 0.0),
    (6, 0.0),                       # clipped to t = 1
    (-1, 1.0),
])
def test_cosine_decay(progress, expected):
    assert cosine_decay(progress, 4) == pytest.approx(expected)


def test_cosine_decay_needs_a_positive_length():
    with pytest.raises(ValueError, match="length > 0"):
        cosine_decay(1, 0)


# -------------------------------------------------------------------------------------------------- perturbations

@pytest.mark.parametrize("shape", [(2, 2, 8, 8), (2, 1, 4, 8, 8)], ids=["2d", "3d"])
def test_perturbation_keeps_shape_dtype_and_input(shape):
    x = torch.randn(shape)
    before = x.clone()
    y = StrongIntensityPerturbation(**ALL_ON)(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    assert torch.equal(x, before)
    assert not torch.equal(y, x)


def test_perturbation_all_off_returns_an_equal_copy():
    x = torch.randn(2, 2, 3, 4, 4)
    y = StrongIntensityPerturbation(**ALL_OFF)(x)
    assert torch.equal(y, x) and y.data_ptr() != x.data_ptr()


def test_perturbation_brightness_exactly_doubles():
    x = torch.randn(3, 2, 4, 5)
    y = StrongIntensityPerturbation(**{**ALL_OFF, "p_brightness": 1.0}, brightness=(2.0, 2.0))(x)
    assert torch.equal(y, 2 * x)


def test_perturbation_is_decided_per_sample():
    # p = 1/2 with factor exactly 2: each of 64 samples is either untouched or doubled; all alike has p = 2^-63.
    x = torch.ones(64, 2, 2, 2)
    y = StrongIntensityPerturbation(**{**ALL_OFF, "p_brightness": 0.5}, brightness=(2.0, 2.0))(
        x, torch.Generator().manual_seed(3))
    per_sample = y.flatten(1)
    assert torch.equal(per_sample.amin(1), per_sample.amax(1))  # the whole sample, both channels
    assert set(per_sample[:, 0].tolist()) == {1.0, 2.0}


def test_perturbation_contrast_by_hand():
    # x = [0, 1, 2, 5], mean 2, factor 2: (x - 2) * 2 + 2 = [-2, 0, 2, 8], clipped to [min, max] = [0, 5].
    x = torch.tensor([[[[0.0, 1.0], [2.0, 5.0]]]])
    y = StrongIntensityPerturbation(**{**ALL_OFF, "p_contrast": 1.0}, contrast=(2.0, 2.0))(x)
    assert torch.allclose(y, torch.tensor([[[[0.0, 0.0], [2.0, 5.0]]]]))


def test_perturbation_gamma_by_hand():
    # x = [0, 1, 2, 4]: rescaled [0, 1/4, 1/2, 1], gamma 1/2 -> [0, 1/2, sqrt(1/2), 1], times 4 -> [0, 2, 2 sqrt 2, 4].
    x = torch.tensor([[[[0.0, 1.0], [2.0, 4.0]]]])
    y = StrongIntensityPerturbation(**{**ALL_OFF, "p_gamma": 1.0}, gamma=(0.5, 0.5))(x)
    assert torch.allclose(y, torch.tensor([[[[0.0, 2.0], [2 * math.sqrt(2), 4.0]]]]))


def test_perturbation_gamma_keeps_min_and_max_per_sample_and_channel():
    x = torch.randn(3, 2, 4, 4, 4) * torch.tensor([1.0, 5.0]).view(1, 2, 1, 1, 1)
    x[1, 0] = 0.7  # a constant channel stays constant
    y = StrongIntensityPerturbation(**{**ALL_OFF, "p_gamma": 1.0})(x, torch.Generator().manual_seed(0))
    assert torch.allclose(y.amin(dim=(2, 3, 4)), x.amin(dim=(2, 3, 4)), atol=1e-6)
    assert torch.allclose(y.amax(dim=(2, 3, 4)), x.amax(dim=(2, 3, 4)), atol=1e-6)
    assert torch.equal(y[1, 0], x[1, 0])
    assert not torch.allclose(y, x)


def test_perturbation_noise_statistics():
    x = torch.zeros(2, 1, 64, 64)
    y = StrongIntensityPerturbation(**{**ALL_OFF, "p_noise": 1.0}, noise_std=(0.5, 0.5))(
        x, torch.Generator().manual_seed(0))
    # 4096 draws per sample: standard error of the std is about 0.5 / sqrt(2 * 4096) = 0.0055.
    assert torch.allclose(y.flatten(1).std(1), torch.tensor([0.5, 0.5]), atol=0.03)
    assert torch.allclose(y.flatten(1).mean(1), torch.zeros(2), atol=0.03)


@pytest.mark.parametrize("spatial, positions", [
    ((9, 9), [(4, 4), (3, 5)]),
    ((9, 9, 9), [(4, 4, 4), (3, 5, 4)]),
], ids=["2d", "3d"])
def test_perturbation_blur_keeps_mass_and_position(spatial, positions):
    x = torch.zeros(2, 1, *spatial)
    for sample, position in enumerate(positions):
        x[(sample, 0, *position)] = 1.0
    y = StrongIntensityPerturbation(**{**ALL_OFF, "p_blur": 1.0}, blur_sigma=(1.0, 1.0))(x)
    # Kernel radius 3 sigma = 3 fits inside the 9-voxel axes, so replicate padding only adds zeros: mass stays 1.
    assert torch.allclose(y.flatten(1).sum(1), torch.ones(2))
    for sample, position in enumerate(positions):
        assert torch.unravel_index(y[sample, 0].argmax(), spatial) == position
    # Separable: the peak is k0^d with k0 = 1 / sum_{i=-3..3} exp(-i^2 / 2).
    k0 = 1 / sum(math.exp(-i * i / 2) for i in range(-3, 4))
    assert y[(0, 0, *positions[0])].item() == pytest.approx(k0 ** len(spatial), rel=1e-5)


def test_perturbation_blur_handles_a_size_one_axis():
    x = torch.randn(2, 1, 1, 6, 6)
    y = StrongIntensityPerturbation(**{**ALL_OFF, "p_blur": 1.0})(x)
    assert y.shape == x.shape and torch.isfinite(y).all()


def test_perturbation_is_deterministic_per_seed():
    x = torch.randn(4, 2, 4, 6, 6)
    perturb = StrongIntensityPerturbation()
    a = perturb(x, torch.Generator().manual_seed(7))
    b = perturb(x, torch.Generator().manual_seed(7))
    c = perturb(x, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_perturbation_half_precision(dtype):
    x = torch.randn(2, 1, 4, 6, 6).to(dtype)
    y = StrongIntensityPerturbation(**ALL_ON)(x, torch.Generator().manual_seed(0))
    assert y.dtype == dtype and torch.isfinite(y).all()
    off = StrongIntensityPerturbation(**ALL_OFF)(x)
    assert torch.equal(off, x)


def test_perturbation_ignores_autocast():
    # CPU autocast would run the blur convolution in bfloat16; trainers call the perturbation inside autocast.
    x = torch.randn(2, 1, 5, 6, 6)
    perturb = StrongIntensityPerturbation(**ALL_ON)
    expected = perturb(x, torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = perturb(x, torch.Generator().manual_seed(0))
    assert y.dtype == torch.float32 and torch.equal(y, expected)


@pytest.mark.parametrize("kwargs", [
    dict(p_noise=-0.1),
    dict(p_blur=1.5),
    dict(brightness=(1.25, 0.75)),
    dict(noise_std=(-0.1, 0.1)),
    dict(gamma=(0.0, 1.5)),
    dict(blur_sigma=(1.0,)),
    dict(contrast=(0.5, float("inf"))),
])
def test_perturbation_bad_config(kwargs):
    with pytest.raises(ValueError):
        StrongIntensityPerturbation(**kwargs)


def test_perturbation_bad_input():
    with pytest.raises(ValueError, match="shape"):
        StrongIntensityPerturbation()(torch.zeros(2, 1, 8))
    with pytest.raises(TypeError, match="floating"):
        StrongIntensityPerturbation()(torch.zeros(2, 1, 8, 8, dtype=torch.int64))


# ---------------------------------------------------------------------------------------------------------- masks

@pytest.mark.parametrize("dtype", [torch.int64, torch.int16, torch.float32])
def test_unlabeled_mask(dtype):
    target = torch.tensor([[[[0, 1], [2, 2]]], [[[2, 0], [1, 0]]]], dtype=dtype)  # (2, 1, 2, 2), ignore label 2
    expected = torch.tensor([[[[False, False], [True, True]]], [[[True, False], [False, False]]]])
    assert torch.equal(unlabeled_mask(target, 2), expected)
    assert torch.equal(unlabeled_mask(target[:, :, None], 2), expected[:, :, None])  # 3D


@pytest.mark.parametrize("shape", [(2, 2, 4, 4), (2, 4, 4), (2, 1, 4, 4, 4, 4)])
def test_unlabeled_mask_bad_shape(shape):
    with pytest.raises(ValueError):
        unlabeled_mask(torch.zeros(shape), 2)


# ---------------------------------------------------------------------------------------------------- consistency

LN3, LN4 = math.log(3), math.log(4)
# Four voxels in a row, (B, C, H, W) = (1, 2, 1, 4); temperature 1/2 squares the odds:
#   v0 teacher (0, ln 3): raw (1/4, 3/4), sharpened (1, 9) / 10 = (1/10, 9/10) >= 0.8 -> counts
#   v1 teacher (0, 0):    (1/2, 1/2) < 0.8                                             -> unlabeled, filtered out
#   v2 teacher (0, ln 3): would pass, but the voxel is labeled                         -> excluded
#   v3 teacher (ln 4, 0): raw (4/5, 1/5), sharpened (16, 1) / 17 >= 0.8               -> counts
TEACHER = torch.tensor([[[[0.0, 0.0, 0.0, LN4]], [[LN3, 0.0, LN3, 0.0]]]])
#   v0 student (0, 0) -> (1/2, 1/2); v3 student (ln 3, 0) -> (3/4, 1/4); v1, v2 large so counting them would show.
STUDENT = torch.tensor([[[[0.0, 5.0, 5.0, LN3]], [[0.0, -5.0, -5.0, 0.0]]]])
MASK = torch.tensor([[[[True, True, False, True]]]])
KL_V0 = 0.1 * math.log(0.1 / 0.5) + 0.9 * math.log(0.9 / 0.5)
KL_V3 = 16 / 17 * math.log((16 / 17) / (3 / 4)) + 1 / 17 * math.log((1 / 17) / (1 / 4))


@pytest.mark.parametrize("spatial_view", [(1, 4), (1, 1, 4)], ids=["2d", "3d"])
def test_consistency_by_hand(spatial_view):
    student = STUDENT.reshape(1, 2, *spatial_view).requires_grad_()
    teacher = TEACHER.reshape(1, 2, *spatial_view).requires_grad_()
    loss, passed = sharpened_consistency_loss(student, teacher, MASK.reshape(1, 1, *spatial_view))
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx((KL_V0 + KL_V3) / 2, rel=1e-5)
    assert passed.item() == pytest.approx(2 / 3)  # 2 counted of 3 unlabeled
    assert not passed.requires_grad
    loss.backward()
    assert teacher.grad is None
    # d KL / d student = softmax(student) - target, over 2 counted voxels:
    #   v0: ((1/2 - 1/10) / 2, (1/2 - 9/10) / 2) = (0.2, -0.2); v3: ((3/4 - 16/17) / 2, (1/4 - 1/17) / 2); v1, v2: 0.
    expected = torch.tensor([[[[0.2, 0.0, 0.0, (3 / 4 - 16 / 17) / 2]], [[-0.2, 0.0, 0.0, (1 / 4 - 1 / 17) / 2]]]])
    assert torch.allclose(student.grad.reshape(expected.shape), expected, atol=1e-6)


def test_consistency_threshold_and_temperature():
    # temperature 1: v0 (1/4, 3/4) fails 0.8, v3 (4/5, 1/5) passes 0.8 (float rounding aside, use 0.79): 1 of 3.
    loss, passed = sharpened_consistency_loss(STUDENT, TEACHER, MASK, temperature=1.0, threshold=0.79)
    kl_v3 = 0.8 * math.log(0.8 / 0.75) + 0.2 * math.log(0.2 / 0.25)
    assert loss.item() == pytest.approx(kl_v3, rel=1e-5)
    assert passed.item() == pytest.approx(1 / 3)
    # threshold 0: every unlabeled voxel counts, v1 included: KL((1/2, 1/2) || softmax(5, -5)) = ln(1/2) - (ln p0 + ln p1) / 2.
    loss, passed = sharpened_consistency_loss(STUDENT, TEACHER, MASK, threshold=0.0)
    log_p = torch.log_softmax(torch.tensor([5.0, -5.0], dtype=torch.float64), 0)
    kl_v1 = math.log(0.5) - 0.5 * log_p.sum().item()
    assert loss.item() == pytest.approx((KL_V0 + kl_v1 + KL_V3) / 3, rel=1e-5)
    assert passed.item() == 1.0


def test_consistency_filter_on_the_raw_teacher_probability():
    # Sharpened, v0 (9/10) and v3 (16/17) pass 0.79; raw, v0 (3/4) fails and v3 (4/5) passes. The target stays sharpened.
    loss, passed = sharpened_consistency_loss(STUDENT, TEACHER, MASK, threshold=0.79, confidence_temperature=1.0)
    assert loss.item() == pytest.approx(KL_V3, rel=1e-5)
    assert passed.item() == pytest.approx(1 / 3)


@pytest.mark.parametrize("mask, threshold", [
    (torch.zeros(1, 1, 1, 4, dtype=torch.bool), 0.8),   # all labeled: fraction 0 / 0 -> 0
    (MASK, 1.0),                                        # unlabeled voxels, none confident enough: 0 / 3
])
def test_consistency_nothing_counts(mask, threshold):
    student = STUDENT.clone().requires_grad_()
    loss, passed = sharpened_consistency_loss(student, TEACHER, mask, threshold=threshold)
    assert loss.item() == 0.0 and passed.item() == 0.0
    assert loss.grad_fn is not None
    loss.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))


def test_consistency_half_precision_computes_in_float32():
    loss, passed = sharpened_consistency_loss(STUDENT.half(), TEACHER.bfloat16(), MASK)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx((KL_V0 + KL_V3) / 2, rel=1e-2)
    assert passed.item() == pytest.approx(2 / 3)


@pytest.mark.parametrize("student, teacher, mask, kwargs, error", [
    (STUDENT, TEACHER[:, :1], MASK, {}, ValueError),
    (STUDENT, TEACHER, MASK.expand(1, 2, 1, 4), {}, ValueError),
    (STUDENT, TEACHER, MASK[..., :3], {}, ValueError),
    (STUDENT[0], TEACHER[0], MASK[0], {}, ValueError),
    (STUDENT, TEACHER, MASK, dict(temperature=0.0), ValueError),
    (STUDENT, TEACHER, MASK, dict(confidence_temperature=0.0), ValueError),
    (STUDENT, TEACHER, MASK, dict(threshold=1.5), ValueError),
    (STUDENT, TEACHER, MASK, dict(threshold=-0.1), ValueError),
    (STUDENT, TEACHER, MASK.float(), {}, TypeError),
])
def test_consistency_bad_arguments(student, teacher, mask, kwargs, error):
    with pytest.raises(error):
        sharpened_consistency_loss(student, teacher, mask, **kwargs)


# ----------------------------------------------------------------------------------------------------- continuity

# Class-0 probability p0 on a (D, W) = (3, 2) grid (H = 1), class 1 = 1 - p0; mask True = unlabeled:
#   d0: p0 [0.50, 1.00]  mask [T, T]
#   d1: p0 [0.75, 0.00]  mask [T, F]   <- a partly annotated slice, as after a rotation
#   d2: p0 [0.25, 1.00]  mask [T, T]
# Both classes differ by the same amount, so a pair contributes 2 * diff^2 over classes.
# axis 0 (D): (d0, d1, w0) 2 * 0.25^2 = 0.125; (d1, d2, w0) 2 * 0.5^2 = 0.5; the w1 pairs touch d1 w1 (labeled).
#             -> (0.125 + 0.5) / (2 pairs * 2 classes) = 0.15625
# axis 2 (W): d0 2 * 0.5^2 = 0.5; d2 2 * 0.75^2 = 1.125; d1 has a labeled voxel.
#             -> (0.5 + 1.125) / (2 * 2) = 0.40625
P0 = torch.tensor([[0.5, 1.0], [0.75, 0.0], [0.25, 1.0]])
PROBS_3D = torch.stack([P0, 1 - P0])[None, :, :, None, :]  # (1, 2, 3, 1, 2)
MASK_3D = torch.tensor([[True, True], [True, False], [True, True]])[None, None, :, None, :]  # (1, 1, 3, 1, 2)


@pytest.mark.parametrize("axis, expected", [
    (0, 0.15625),
    (-3, 0.15625),
    (2, 0.40625),
    (-1, 0.40625),
    (1, 0.0),       # size 1 along H: no pairs
])
def test_continuity_3d_by_hand(axis, expected):
    probs = PROBS_3D.clone().requires_grad_()
    loss = axial_continuity_loss(probs, MASK_3D, axis)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected)
    assert loss.grad_fn is not None
    loss.backward()
    assert probs.grad is not None


@pytest.mark.parametrize("axis, expected", [(0, 0.15625), (1, 0.40625), (-1, 0.40625)])
def test_continuity_2d_by_hand(axis, expected):
    loss = axial_continuity_loss(PROBS_3D[:, :, :, 0], MASK_3D[:, :, :, 0], axis)  # (1, 2, 3, 2)
    assert loss.item() == pytest.approx(expected)


def test_continuity_gradient_by_hand():
    # axis 0, class 0, w0: d loss / d p[d0] = 2 (p[d0] - p[d1]) / 4 = 2 * (-0.25) / 4 = -0.125,
    # p[d1] = -(-0.125) + 2 (0.75 - 0.25) / 4 = 0.375, p[d2] = -2 * 0.5 / 4 = -0.25; class 1 the opposite sign;
    # w1 only takes part in pairs with the labeled voxel d1 w1: gradient 0.
    probs = PROBS_3D.clone().requires_grad_()
    axial_continuity_loss(probs, MASK_3D, 0).backward()
    g0 = torch.tensor([[-0.125, 0.0], [0.375, 0.0], [-0.25, 0.0]])
    assert torch.allclose(probs.grad, torch.stack([g0, -g0])[None, :, :, None, :])


def test_continuity_no_unlabeled_pair_and_half_precision():
    probs = PROBS_3D.half().requires_grad_()
    mask = torch.zeros_like(MASK_3D)
    mask[0, 0, 1] = True  # one unlabeled slice has no unlabeled neighbour
    loss = axial_continuity_loss(probs, mask, 0)
    assert loss.item() == 0.0 and loss.dtype == torch.float32
    loss.backward()
    assert torch.equal(probs.grad, torch.zeros_like(probs))
    assert axial_continuity_loss(PROBS_3D.bfloat16(), MASK_3D, 0).item() == pytest.approx(0.15625)


# Labels (e.g. the teacher's argmax) on the same grid: d0 [0, 0], d1 [0, 1], d2 [1, 0].
# axis 0: (d0, d1, w0) same label, 0.125; (d1, d2, w0) crosses a label change -> 0.125 / (1 pair * 2) = 0.0625
# axis 2: d0 same label, 0.5; d2 crosses -> 0.5 / (1 * 2) = 0.25
LABELS_3D = torch.tensor([[0, 0], [0, 1], [1, 0]])[None, None, :, None, :]


@pytest.mark.parametrize("axis, expected", [(0, 0.0625), (2, 0.25), (1, 0.0)])
def test_continuity_across_label_changes_is_left_out(axis, expected):
    probs = PROBS_3D.clone().requires_grad_()
    loss = axial_continuity_loss(probs, MASK_3D, axis, LABELS_3D)
    assert loss.item() == pytest.approx(expected)
    loss.backward()
    if axis == 0:  # only the (d0, d1, w0) pair is left: d2 gets no gradient
        assert probs.grad[0, :, 2].abs().sum() == 0 and probs.grad[0, :, 0, 0, 0].abs().sum() > 0
    # Equal labels everywhere count every unlabeled pair, as without labels.
    assert axial_continuity_loss(PROBS_3D, MASK_3D, axis, torch.zeros_like(LABELS_3D)).item() == \
        pytest.approx(axial_continuity_loss(PROBS_3D, MASK_3D, axis).item())


@pytest.mark.parametrize("probs, mask, axis, error", [
    (PROBS_3D, MASK_3D, 3, ValueError),
    (PROBS_3D, MASK_3D, -4, ValueError),
    (PROBS_3D, MASK_3D[:, :, :2], 0, ValueError),
    (PROBS_3D, MASK_3D.expand(1, 2, 3, 1, 2), 0, ValueError),
    (PROBS_3D[0], MASK_3D[0], 0, ValueError),
    (PROBS_3D, MASK_3D.float(), 0, TypeError),
])
def test_continuity_bad_arguments(probs, mask, axis, error):
    with pytest.raises(error):
        axial_continuity_loss(probs, mask, axis)


def test_continuity_labels_must_have_the_mask_shape():
    with pytest.raises(ValueError, match="labels"):
        axial_continuity_loss(PROBS_3D, MASK_3D, 0, LABELS_3D[:, :, :2])
