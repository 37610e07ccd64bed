"""Model units and the user's: the affine Scaler fitted to a run's training split (images to
[−1, 1], vectors to mean 0 and std σ_data), stored with the run so samples map back.

Everything downstream of cmkit.data sees model units; a run's config keeps its Scaler.
"""

from dataclasses import dataclass

import numpy as np

from cmkit.errors import UserError
from cmkit.noise import SIGMA_DATA


@dataclass(frozen=True)
class Scaler:
    """Affine map between the user's units and model units: model = (raw - shift) / scale.

    shift and scale hold one value per feature for (N, D) vectors, or a single value for images.
    """

    shift: tuple[float, ...]
    scale: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.shift) != len(self.scale) or not self.shift:
            raise UserError(
                f"scaler has {len(self.shift)} shifts and {len(self.scale)} scales; "
                "expected the same non-zero number of each"
            )
        if not all(np.isfinite(self.shift)) or not all(
            s > 0 and np.isfinite(s) for s in self.scale
        ):
            raise UserError(
                f"scaler has shift {self.shift}, scale {self.scale}; "
                "expected finite shifts and positive finite scales"
            )

    @classmethod
    def fit(cls, x: np.ndarray, sigma_data: float = SIGMA_DATA) -> "Scaler":
        """Images (N, C, H, W): global min/max -> [-1, 1]. Vectors (N, D): mean 0, std σ_data."""
        if not sigma_data > 0:
            raise UserError(f"sigma_data must be positive, got {sigma_data}")
        if x.ndim == 4:
            lo, hi = float(x.min()), float(x.max())
            half_range = (hi - lo) / 2
            return cls(shift=((hi + lo) / 2,), scale=(half_range if half_range > 0 else 1.0,))
        if x.ndim == 2:
            mean = x.mean(axis=0, dtype=np.float64)
            std = x.std(axis=0, dtype=np.float64)
            scale = np.where(std > 0, std / sigma_data, 1.0)
            return cls(shift=tuple(map(float, mean)), scale=tuple(map(float, scale)))
        raise UserError(f"cannot fit a scaler to shape {x.shape}; expected (N, D) or (N, C, H, W)")

    def to_model(self, raw: np.ndarray) -> np.ndarray:
        """(N, ...) raw values -> float32 model units."""
        shift, scale = self._params(raw)
        return ((raw.astype(np.float64) - shift) / scale).astype(np.float32)

    def to_raw(self, model: np.ndarray) -> np.ndarray:
        """(N, ...) model units -> float32 values in the user's units."""
        shift, scale = self._params(model)
        return (model.astype(np.float64) * scale + shift).astype(np.float32)

    def _params(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """shift and scale shaped to broadcast against x, checking the feature count matches."""
        if len(self.shift) > 1 and (x.ndim != 2 or x.shape[1] != len(self.shift)):
            raise UserError(
                f"array of shape {x.shape} does not fit a scaler for {len(self.shift)} "
                f"features; expected shape (N, {len(self.shift)})"
            )
        return np.asarray(self.shift), np.asarray(self.scale)

    def to_dict(self) -> dict:
        """JSON-friendly form; from_dict(to_dict()) gives an equal Scaler."""
        return {"shift": list(self.shift), "scale": list(self.scale)}

    @classmethod
    def from_dict(cls, d: dict) -> "Scaler":
        """Inverse of to_dict, e.g. after a JSON round trip."""
        try:
            shift, scale = tuple(map(float, d["shift"])), tuple(map(float, d["scale"]))
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(
                f"scaler record {d!r} is malformed; expected lists of numbers under 'shift' "
                "and 'scale'"
            ) from e
        return cls(shift=shift, scale=scale)


def to_unit(x):
    """Images in model units [−1, 1] -> [0, 1], what PNG writers and feature extractors read."""
    return (x + 1) / 2
