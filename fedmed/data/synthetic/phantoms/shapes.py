"""Geometry both phantom families draw with: the organ's frame, random rotations and the volume of a ball."""

from __future__ import annotations

import math

import numpy as np


class Frame:
    """The organ's centre, semi-axes and rotation, so that blobs can be placed inside it."""

    def __init__(self, center: np.ndarray, radii: np.ndarray, rotation: np.ndarray) -> None:
        self.center = center
        self.radii = radii
        self.rotation = rotation

    def inner_point(self, *, margin: float, rng: np.random.Generator) -> np.ndarray:
        """A uniform point in the organ, at least `margin` voxels from its surface when possible."""
        ndim = len(self.center)
        direction = rng.normal(size=ndim)
        direction /= np.linalg.norm(direction) + 1e-12
        reach = max(0.0, 1.0 - margin / float(self.radii.min()))
        local = direction * reach * rng.uniform() ** (1.0 / ndim) * self.radii
        return self.center + self.rotation @ local


def random_rotation(ndim: int, *, rng: np.random.Generator, max_angle: float) -> np.ndarray:
    angles = rng.uniform(-max_angle, max_angle, size=1 if ndim == 2 else 3)
    if ndim == 2:
        c, s = math.cos(angles[0]), math.sin(angles[0])
        return np.array([[c, -s], [s, c]])
    rotation = np.eye(3)
    for axis, angle in enumerate(angles):
        c, s = math.cos(angle), math.sin(angle)
        first, second = [index for index in range(3) if index != axis]
        turn = np.eye(3)
        turn[first, first], turn[first, second], turn[second, first], turn[second, second] = c, -s, s, c
        rotation = rotation @ turn
    return rotation


def ball_volume(radius: float, ndim: int) -> float:
    return math.pi * radius**2 if ndim == 2 else 4.0 / 3.0 * math.pi * radius**3
