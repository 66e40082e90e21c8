"""Strong, intensity-only, per-sample random perturbations applied on the device.

Nothing here moves a voxel, so a perturbed student view stays voxel-aligned with the teacher's weak view and the
teacher's prediction can be used as a per-voxel target without warping it back.
"""

import dataclasses
import math

import torch
import torch.nn.functional as F

from nnunet_ext.semi_supervised._checks import check_batch_tensor

_RANGE_FIELDS = {  # field -> (smallest allowed lower bound, whether that bound itself is allowed)
    "noise_std": (0.0, True),
    "brightness": (0.0, True),
    "contrast": (0.0, True),
    "gamma": (0.0, False),
    "blur_sigma": (0.0, True),
}
_PROBABILITY_FIELDS = ("p_noise", "p_brightness", "p_contrast", "p_gamma", "p_blur")
# Columns of the per-sample random table: one "apply?" draw per perturbation, then the magnitudes.
_N_FLAGS = len(_PROBABILITY_FIELDS)
_COL_NOISE_STD, _COL_BLUR_SIGMA = _N_FLAGS, _N_FLAGS + 1
_N_SCALAR_COLUMNS = _N_FLAGS + 2
# Truncate the Gaussian kernel at 3 sigma: it then holds > 99.7 % of the mass.
_BLUR_TRUNCATE = 3.0


@dataclasses.dataclass(frozen=True)
class StrongIntensityPerturbation:
    """Random Gaussian noise, blur, brightness, contrast and gamma, drawn independently for every sample.

    Applied in nnU-Net's augmentation order: noise, blur, brightness, contrast, gamma. Each sample draws whether each
    perturbation is applied (with its ``p_*``) and how strongly (uniformly from its range); brightness, contrast and
    gamma draw one value per sample and channel, noise std and blur sigma one value per sample. Lists are accepted
    for the ranges (e.g. from a JSON config) and stored as tuples of floats.

    Args:
        noise_std: range of the additive Gaussian noise std (data is z-scored), lower bound >= 0.
        brightness: range of the multiplicative factor, lower bound >= 0.
        contrast: range of the factor scaling around the per-sample/channel mean; the result is clipped to the
            original per-sample/channel [min, max], like nnU-Net's ContrastTransform with preserve_range.
        gamma: range of the exponent, lower bound > 0, applied to intensities rescaled to [0, 1] per
            sample/channel, then mapped back to the original [min, max] (min and max are kept).
        blur_sigma: range of the Gaussian blur sigma in voxels, the same along every spatial axis; separable
            convolution with replicate padding, kernel truncated at 3 sigma.
        p_noise, p_brightness, p_contrast, p_gamma, p_blur: probabilities in [0, 1].

    Raises:
        ValueError: for a probability outside [0, 1], a range that is not two finite numbers (low, high) with
            low <= high, or a lower bound below its limit.
    """

    noise_std: tuple[float, float] = (0.0, 0.1)
    p_noise: float = 0.5
    brightness: tuple[float, float] = (0.75, 1.25)
    p_brightness: float = 0.5
    contrast: tuple[float, float] = (0.75, 1.25)
    p_contrast: float = 0.5
    gamma: tuple[float, float] = (0.7, 1.5)
    p_gamma: float = 0.3
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    p_blur: float = 0.2

    def __post_init__(self) -> None:
        for name in _PROBABILITY_FIELDS:
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        for name, (limit, limit_allowed) in _RANGE_FIELDS.items():
            value = getattr(self, name)
            if len(value) != 2 or not all(math.isfinite(v) for v in value):
                raise ValueError(f"{name} must be two finite numbers (low, high), got {value}")
            low, high = float(value[0]), float(value[1])
            if low > high:
                raise ValueError(f"{name} range is inverted: low {low} > high {high}")
            if low < limit or (low == limit and not limit_allowed):
                raise ValueError(f"{name} lower bound must be {'>=' if limit_allowed else '>'} {limit}, got {low}")
            # Frozen dataclass: normalise lists from configs to tuples so instances stay hashable.
            object.__setattr__(self, name, (low, high))

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Perturb a batch; ``x`` itself is not modified.

        Random numbers: the per-sample decisions and magnitudes (a small table) are drawn from ``generator`` on its
        own device (or from torch's default CPU generator when None) and read on the host, so a CPU generator causes
        no device synchronisation for CUDA inputs. The noise field is drawn on ``x.device``: from ``generator`` when
        it lives there, otherwise from a generator on ``x.device`` seeded from ``generator`` (or, when None, from
        torch's default generator of that device). The same seeded generator therefore gives the same output.

        Args:
            x: (B, C, H, W) or (B, C, D, H, W) float tensor (float16 / bfloat16 are computed in float32), any device.
            generator: optional torch.Generator, any device; a CPU generator is recommended.

        Returns:
            a new tensor with the shape, dtype and device of ``x``.

        Raises:
            ValueError: when ``x`` does not have 2 or 3 spatial dims.
            TypeError: when ``x`` is not floating point.
        """
        check_batch_tensor("x", x)
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating point tensor, got {x.dtype}")
        # Trainers call this inside their autocast region, which would run the blur convolution in half precision.
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self._perturb(x, generator)

    def _perturb(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        batch, channels = x.shape[:2]
        spatial_dims = tuple(range(2, x.ndim))
        # copy=True: y is ours to modify in place, and an unperturbed sample comes back bit-identical.
        y = x.to(torch.promote_types(x.dtype, torch.float32), copy=True)

        draw_device = generator.device if generator is not None else torch.device("cpu")
        table = torch.rand((batch, _N_SCALAR_COLUMNS + 3 * channels), generator=generator, device=draw_device)
        table_host = table.cpu()
        table = table.to(device=x.device, dtype=y.dtype)
        apply = [torch.nonzero(table_host[:, i] < getattr(self, name)).flatten().tolist()
                 for i, name in enumerate(_PROBABILITY_FIELDS)]
        apply_noise, apply_brightness, apply_contrast, apply_gamma, apply_blur = apply
        per_channel = table[:, _N_SCALAR_COLUMNS:].view(batch, 3, channels)
        view_shape = (batch, channels) + (1,) * len(spatial_dims)

        if apply_noise:
            std = _uniform(self.noise_std, table[apply_noise, _COL_NOISE_STD])
            noise = torch.randn((len(apply_noise), *y.shape[1:]), generator=self._device_generator(generator, x),
                                device=x.device, dtype=y.dtype)
            y[apply_noise] += noise * std.view(-1, *(1,) * (y.ndim - 1))
        if apply_blur:
            sigma_host = _uniform(self.blur_sigma, table_host[apply_blur, _COL_BLUR_SIGMA])
            y[apply_blur] = _gaussian_blur(y[apply_blur], sigma_host)
        if apply_brightness:
            factor = _uniform(self.brightness, per_channel[:, 0]).view(view_shape)
            y[apply_brightness] *= factor[apply_brightness]
        if apply_contrast:
            factor = _uniform(self.contrast, per_channel[:, 1]).view(view_shape)
            y[apply_contrast] = _contrast(y[apply_contrast], factor[apply_contrast], spatial_dims)
        if apply_gamma:
            exponent = _uniform(self.gamma, per_channel[:, 2]).view(view_shape)
            y[apply_gamma] = _gamma(y[apply_gamma], exponent[apply_gamma], spatial_dims)
        return y.to(x.dtype)

    @staticmethod
    def _device_generator(generator: torch.Generator | None, x: torch.Tensor) -> torch.Generator | None:
        if generator is None or generator.device == x.device:
            return generator
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
        device_generator = torch.Generator(device=x.device)
        device_generator.manual_seed(seed)
        return device_generator


def _uniform(bounds: tuple[float, float], u: torch.Tensor) -> torch.Tensor:
    """Map uniform [0, 1) draws to [low, high]; exactly ``low`` when low == high."""
    low, high = bounds
    return low + (high - low) * u


def _contrast(y: torch.Tensor, factor: torch.Tensor, spatial_dims: tuple[int, ...]) -> torch.Tensor:
    """(y - mean) * factor + mean per sample/channel, clipped to the original [min, max]."""
    mean = y.mean(dim=spatial_dims, keepdim=True)
    low, high = y.amin(dim=spatial_dims, keepdim=True), y.amax(dim=spatial_dims, keepdim=True)
    return torch.minimum(torch.maximum((y - mean) * factor + mean, low), high)


def _gamma(y: torch.Tensor, exponent: torch.Tensor, spatial_dims: tuple[int, ...]) -> torch.Tensor:
    """Gamma on intensities rescaled to [0, 1] per sample/channel, mapped back to the original [min, max]."""
    low = y.amin(dim=spatial_dims, keepdim=True)
    # clamp: a constant channel maps 0 -> 0 and stays constant instead of dividing by 0.
    scale = (y.amax(dim=spatial_dims, keepdim=True) - low).clamp_min(torch.finfo(y.dtype).tiny)
    return ((y - low) / scale).pow(exponent) * scale + low


def _gaussian_blur(y: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of (N, C, *spatial) with one sigma per sample (``sigma``: CPU tensor of N)."""
    n, channels, *spatial = y.shape
    radius = math.ceil(_BLUR_TRUNCATE * float(sigma.max()))
    offsets = torch.arange(-radius, radius + 1, dtype=y.dtype, device=y.device)
    # One kernel per (sample, channel) group; clamp so sigma 0 gives a delta instead of 0 / 0.
    sigma = sigma.to(device=y.device, dtype=y.dtype).clamp_min(1e-3).repeat_interleave(channels)
    kernel = torch.exp(-0.5 * (offsets / sigma[:, None]) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    conv = F.conv2d if len(spatial) == 2 else F.conv3d
    # Samples and channels become groups of one grouped convolution: one call per axis for the whole batch.
    out = y.reshape(1, n * channels, *spatial)
    for axis, size in enumerate(spatial):
        if size == 1:
            continue
        kernel_shape = [n * channels, 1] + [2 * radius + 1 if a == axis else 1 for a in range(len(spatial))]
        pad = [0, 0] * len(spatial)
        # F.pad lists the last dim first.
        pad[2 * (len(spatial) - 1 - axis)] = pad[2 * (len(spatial) - 1 - axis) + 1] = radius
        out = conv(F.pad(out, pad, mode="replicate"), kernel.view(kernel_shape), groups=n * channels)
    return out.reshape(y.shape)
