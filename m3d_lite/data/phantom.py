"""M3D-Phantom: one synthetic abdominal CT scan with exactly known organs, lesions and findings.

The real M3D data cannot be downloaded, so the course trains on phantoms whose ground truth is
known: a Hounsfield-unit volume, an organ label map, a lesion instance map and a findings record
(contrast phase, acquisition plane, display window, lesions with organ, sub-location, size and
attenuation) from which ``text.py`` writes the reports and questions.

Anatomy is drawn in millimetres in patient coordinates, LPS like ITK: x to the patient's Left,
y Posterior, z Superior, origin at the centre of the field of view. Arrays are (D, H, W) = (z, y, x),
so the patient's right is at small x indices and row 0 of an axial slice is anterior. Because
shapes live in millimetres, every scale (ci, small, paper) shows the same anatomy at a different
resolution. Organs are lobulated ellipsoids, tubes and capsule chains, bent by one smooth random
displacement field; texture is smooth noise made at coarse resolution and upsampled by separable
B-spline matrices (no scipy), plus white "quantum" noise.

Each case draws from four independent random streams (findings, anatomy, placement, noise), so the
findings of a seed (phase, plane, window, lesion organs, kinds, sub-locations) do not depend on the
grid; only lesion sizes are floored at three raw voxels so that lesions survive the resize to the
model's 32 slices.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from m3d_lite.data.preprocess import WINDOWS

ORGANS: dict[int, str] = {
    1: "liver",
    2: "spleen",
    3: "right kidney",
    4: "left kidney",
    5: "pancreas",
    6: "aorta",
    7: "inferior vena cava",
    8: "stomach",
    9: "gallbladder",
    10: "vertebrae",
    11: "lungs",
}
ORGAN_LABELS: dict[str, int] = {name: label for label, name in ORGANS.items()}
PHASES = ("non-contrast", "arterial", "portal venous", "delayed")
PLANES = ("axial", "coronal", "sagittal")
WINDOW_NAMES = tuple(WINDOWS)
LESION_KINDS = ("cyst", "solid mass", "calcification", "stone")

# Where lesions may occur, which kinds, and how each organ is divided for "location" questions.
LESION_ORGAN_KINDS: dict[str, tuple[str, ...]] = {
    "liver": ("cyst", "solid mass", "calcification"),
    "spleen": ("cyst", "solid mass", "calcification"),
    "right kidney": ("cyst", "solid mass", "stone"),
    "left kidney": ("cyst", "solid mass", "stone"),
    "pancreas": ("cyst", "solid mass", "calcification"),
    "gallbladder": ("stone",),
}
SUBLOCATIONS: dict[str, tuple[str, ...]] = {
    "liver": ("right lobe", "left lobe"),
    "spleen": ("upper pole", "lower pole"),
    "right kidney": ("upper pole", "interpolar region", "lower pole"),
    "left kidney": ("upper pole", "interpolar region", "lower pole"),
    "pancreas": ("head", "body", "tail"),
    "gallbladder": ("fundus", "body", "neck"),
}
_LESION_ORGAN_WEIGHTS = {
    "liver": 0.34,
    "spleen": 0.1,
    "right kidney": 0.16,
    "left kidney": 0.16,
    "pancreas": 0.14,
    "gallbladder": 0.1,
}
_SIZE_RANGE_MM = {"cyst": (12, 45), "solid mass": (15, 55), "calcification": (12, 18), "stone": (12, 20)}
_ORGAN_MAX_LESION_MM = {
    "liver": 55,
    "spleen": 38,
    "right kidney": 36,
    "left kidney": 36,
    "pancreas": 24,
    "gallbladder": 18,
}
MIN_LESION_MM = 12.0
_NUM_LESIONS_P = (0.25, 0.35, 0.25, 0.15)  # P(0), P(1), P(2), P(3) lesions per case
_CHOLECYSTECTOMY_P = 0.08
_PHASE_P = (0.2, 0.25, 0.35, 0.2)
_PLANE_P = (0.5, 0.3, 0.2)
_WINDOW_P = (0.6, 0.2, 0.2)
NOISE_HU = 10.0


@dataclass(frozen=True)
class Lesion:
    """One lesion: its id in the lesion map, kind, organ, sub-location, diameter, attenuation and mean HU."""

    lesion_id: int
    kind: str
    organ: str
    sublocation: str
    size_mm: int
    attenuation: str
    hu: int


@dataclass(frozen=True)
class Findings:
    """Everything the texts may say about a case: acquisition and what is in it."""

    case_id: str
    phase: str
    plane: str
    window: str
    organs: tuple[str, ...]
    lesions: tuple[Lesion, ...]


@dataclass
class PhantomCase:
    """A phantom scan: HU volume, spacing (z, y, x mm), organ and lesion label maps, findings."""

    case_id: str
    hu: np.ndarray
    spacing: tuple[float, float, float]
    organ_labels: np.ndarray
    lesion_labels: np.ndarray
    findings: Findings


# --------------------------------------------------------------------------------------------
# Tissues: HU per phase (non-contrast, arterial, portal venous, delayed), texture SD, organ label.
_TISSUES: dict[str, tuple[tuple[float, float, float, float], float, int]] = {
    "air": ((-1000, -1000, -1000, -1000), 0, 0),
    "fat": ((-100, -100, -100, -100), 12, 0),
    "muscle": ((50, 55, 65, 60), 7, 0),
    "rib": ((550, 550, 550, 550), 80, 0),
    "disc": ((85, 85, 85, 85), 6, 0),
    "canal": ((15, 15, 15, 15), 4, 0),
    "bowel wall": ((40, 85, 95, 75), 8, 0),
    "bowel fluid": ((15, 15, 15, 15), 4, 0),
    "bowel gas": ((-1000, -1000, -1000, -1000), 0, 0),
    "feces": ((-60, -60, -60, -60), 90, 0),
    "heart": ((40, 300, 170, 125), 6, 0),
    "liver": ((58, 72, 112, 92), 6, 1),
    "spleen": ((45, 125, 120, 95), 10, 2),
    "right cortex": ((30, 185, 165, 135), 6, 3),
    "right medulla": ((30, 70, 160, 140), 6, 3),
    "right sinus": ((-60, -60, -60, -60), 10, 3),
    "right collecting": ((5, 5, 15, 320), 5, 3),
    "left cortex": ((30, 185, 165, 135), 6, 4),
    "left medulla": ((30, 70, 160, 140), 6, 4),
    "left sinus": ((-60, -60, -60, -60), 10, 4),
    "left collecting": ((5, 5, 15, 320), 5, 4),
    "pancreas": ((40, 110, 95, 75), 14, 5),
    "aorta": ((42, 320, 165, 120), 4, 6),
    "ivc": ((40, 75, 145, 115), 5, 7),
    "stomach wall": ((40, 100, 95, 75), 6, 8),
    "stomach fluid": ((10, 10, 10, 10), 3, 8),
    "stomach gas": ((-1000, -1000, -1000, -1000), 0, 8),
    "gallbladder": ((10, 10, 10, 10), 3, 9),
    "cancellous": ((240, 240, 240, 240), 45, 10),
    "cortical": ((750, 750, 750, 750), 70, 10),
    "lung": ((-860, -860, -860, -860), 25, 11),
}
_CODE = {name: code for code, name in enumerate(_TISSUES)}
_HU_LUT = np.array([[hu[p] for hu, _, _ in _TISSUES.values()] for p in range(4)], dtype=np.float32)
_TEX_LUT = np.array([tex for _, tex, _ in _TISSUES.values()], dtype=np.float32)
_LABEL_LUT = np.array([label for _, _, label in _TISSUES.values()], dtype=np.uint8)
_HOST_TISSUE = {
    "liver": "liver",
    "spleen": "spleen",
    "right kidney": "right cortex",
    "left kidney": "left cortex",
    "pancreas": "pancreas",
    "gallbladder": "gallbladder",
}


# --------------------------------------------------------------------------------------------
# Smooth noise: white noise on a coarse lattice, upsampled by separable cubic B-spline matrices.
@functools.lru_cache(maxsize=64)
def _bspline_matrix(n_out: int, n_coarse: int) -> np.ndarray:
    """(n_out, n_coarse) cubic B-spline weights, each row scaled to unit sum of squares (unit variance)."""
    t = 1.0 + (np.arange(n_out) + 0.5) / n_out * (n_coarse - 3)
    i = np.floor(t).astype(int)
    f = t - i
    weights = np.stack([(1 - f) ** 3, 3 * f**3 - 6 * f**2 + 4, -3 * f**3 + 3 * f**2 + 3 * f + 1, f**3]) / 6
    matrix = np.zeros((n_out, n_coarse), dtype=np.float32)
    for k in range(4):
        matrix[np.arange(n_out), i - 1 + k] = weights[k]
    return matrix / np.sqrt((matrix**2).sum(axis=1, keepdims=True))


def smooth_noise(rng: np.random.Generator, shape, spacing, cell_mm: float) -> np.ndarray:
    """Zero-mean, unit-SD noise of ``shape`` whose features are about ``cell_mm`` wide (float32)."""
    coarse = [max(4, math.ceil(n * s / cell_mm) + 3) for n, s in zip(shape, spacing, strict=True)]
    lattice = rng.standard_normal(coarse, dtype=np.float32)
    mz, my, mx = (_bspline_matrix(n, c) for n, c in zip(shape, coarse, strict=True))
    field = (mz @ lattice.reshape(coarse[0], -1)).reshape(shape[0], coarse[1], coarse[2])
    return np.matmul(my, field @ mx.T)


# --------------------------------------------------------------------------------------------
# Geometry helpers. Points are (z, y, x) in mm; boxes are index slices around a shape.
def _rotation(rng: np.random.Generator, max_deg: float, about: str | None = None) -> np.ndarray:
    """A rotation matrix: about one axis ('z', 'y', 'x') or random small angles about all three."""

    def rot(axis: int, deg: float) -> np.ndarray:
        c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
        a, b = [k for k in range(3) if k != axis]
        m = np.eye(3)
        m[a, a], m[a, b], m[b, a], m[b, b] = c, -s, s, c
        return m

    if about is not None:
        return rot("zyx".index(about), max_deg)
    m = np.eye(3)
    for axis in range(3):
        m = m @ rot(axis, rng.uniform(-max_deg, max_deg))
    return m


class _Canvas:
    """The grid being painted: deformed mm coordinates, shape noise and the tissue code map."""

    def __init__(self, shape, spacing, rng_noise: np.random.Generator):
        self.shape = tuple(shape)
        self.axes = [
            ((np.arange(n) - (n - 1) / 2) * s).astype(np.float32) for n, s in zip(shape, spacing, strict=True)
        ]
        bend = [smooth_noise(rng_noise, shape, spacing, 70.0) * 5.0 for _ in range(3)]
        self.z = self.axes[0][:, None, None] + bend[0]
        self.y = self.axes[1][None, :, None] + bend[1]
        self.x = self.axes[2][None, None, :] + bend[2]
        self.lobes = smooth_noise(rng_noise, shape, spacing, 30.0)
        self.texture = smooth_noise(rng_noise, shape, spacing, 9.0)
        self.tissue = np.zeros(shape, dtype=np.uint8)
        self.subloc = np.zeros(shape, dtype=np.uint8)

    def box(self, center, radius) -> tuple[slice, slice, slice]:
        """Index slices covering ``center`` +- ``radius`` mm (plus a margin for the bending)."""
        out = []
        for axis, c, r in zip(self.axes, center, radius, strict=True):
            lo, hi = np.searchsorted(axis, [c - r - 14, c + r + 14])
            out.append(slice(int(lo), int(max(hi, lo + 1))))
        return tuple(out)

    def local(self, sl, center, rotation=None):
        """Coordinates in ``sl`` relative to ``center``, rotated into the shape's frame."""
        d = (self.z[sl] - center[0], self.y[sl] - center[1], self.x[sl] - center[2])
        if rotation is None:
            return d
        return tuple(rotation[i, 0] * d[0] + rotation[i, 1] * d[1] + rotation[i, 2] * d[2] for i in range(3))

    def ellipsoid(self, center, axes, rotation=None, lobulation=0.0):
        """(box, inside mask, normalised radius^2, local coords) of a lobulated ellipsoid."""
        sl = self.box(center, [max(axes)] * 3)
        u = self.local(sl, center, rotation)
        q = (u[0] / axes[0]) ** 2 + (u[1] / axes[1]) ** 2 + (u[2] / axes[2]) ** 2
        limit = (1.0 + lobulation * self.lobes[sl]) ** 2 if lobulation else 1.0
        return sl, q < limit, q, u

    def paint(self, sl, mask, tissue: str, subloc: np.ndarray | int | None = None):
        """Set the tissue (and optionally sub-location index) of ``mask`` voxels inside box ``sl``."""
        self.tissue[sl][mask] = _CODE[tissue]
        if subloc is not None:
            values = subloc[mask] if isinstance(subloc, np.ndarray) else subloc
            self.subloc[sl][mask] = values


# --------------------------------------------------------------------------------------------
# Anatomy. Nominal positions are for a cavity of 130 x 80 mm (x, y half-axes), scaled per patient.
@dataclass
class _Body:
    """Per-patient scale of the cavity (kx, ky), its centre yc, the cavity mask and the diaphragm height."""

    kx: float
    ky: float
    yc: float
    cavity: np.ndarray  # full-grid bool: inside the abdominal cavity
    dome: np.ndarray  # full-grid float: diaphragm height (mm) at each (y, x), as a 3D array

    def at(self, z: float, y: float, x: float) -> tuple[float, float, float]:
        """Map a nominal (z, y, x) position to this patient's body."""
        return (z, self.yc + (y + 8.0) * self.ky, x * self.kx)


def _paint_body(cv: _Canvas, rng: np.random.Generator) -> _Body:
    """Elliptical body: subcutaneous fat, muscle wall with ribs, fat-filled cavity; and the diaphragm."""
    half_x, half_y = 160.0 * rng.uniform(0.88, 1.06), 118.0 * rng.uniform(0.88, 1.06)
    fat, wall = rng.uniform(10, 32), rng.uniform(8, 13)
    p = 2.4

    def superellipse(ax: float, ay: float, yc: float) -> np.ndarray:
        return np.abs(cv.x / ax) ** p + np.abs((cv.y - yc) / ay) ** p

    body = superellipse(half_x, half_y, 0.0) < 1
    muscle = superellipse(half_x - fat, half_y - fat, 0.0) < 1
    ax_c, ay_c, yc = half_x - fat - wall, half_y - fat - wall - 8.0, -8.0
    cavity = superellipse(ax_c, ay_c, yc) < 1
    cv.tissue[body] = _CODE["fat"]
    cv.tissue[muscle] = _CODE["muscle"]
    cv.tissue[cavity] = _CODE["fat"]
    kx, ky = ax_c / 130.0, ay_c / 80.0

    # ribs: oblique bony bands in the first 9 mm of the wall, above the costal margin
    shell = (superellipse(ax_c + 9, ay_c + 9, yc) < 1) & ~cavity
    level = np.mod(cv.z + 0.5 * cv.y + rng.uniform(0, 30), 30.0) < 9.0
    above_margin = cv.z > -30.0 - 0.45 * cv.y
    ribs = shell & level & above_margin & ~((cv.y < 0) & (np.abs(cv.x) < 35 * kx))
    cv.tissue[ribs] = _CODE["rib"]

    # diaphragm: a dome per side, highest over the centre of each hemithorax
    # (lowest in the posterior costophrenic recesses, higher anteriorly)
    dome = np.full(cv.shape, -np.inf, dtype=np.float32)
    for side, top in ((-1, rng.uniform(80, 95)), (1, rng.uniform(70, 88))):
        dx, dy = (cv.x - side * 65 * kx) / (70 * kx), (cv.y - 10 * ky) / (70 * ky)
        dome = np.maximum(dome, top - 45.0 * dx**2 - np.where(dy < 0, 25.0, 60.0) * dy**2)
    return _Body(kx=kx, ky=ky, yc=yc, cavity=cavity, dome=dome)


def _jitter(rng: np.random.Generator, point, mm: float = 6.0) -> tuple[float, float, float]:
    return tuple(float(v + rng.uniform(-mm, mm)) for v in point)


def _sizes(rng: np.random.Generator, axes, spread: float = 0.12) -> tuple[float, float, float]:
    return tuple(float(a * rng.uniform(1 - spread, 1 + spread)) for a in axes)


def _paint_spine(cv: _Canvas, body: _Body, rng: np.random.Generator) -> None:
    """Vertebral bodies (cortex + cancellous) with discs, posterior arch, canal and psoas muscles."""
    _, y0, _ = body.at(0, 46, 0)
    period, disc, offset = rng.uniform(30, 36), rng.uniform(6, 8), rng.uniform(0, 36)
    levels = np.mod(cv.z - offset, period)
    is_disc = levels < disc
    ry, rx = 16.0, 20.0
    # psoas: lateral to the vertebral bodies, growing caudally
    for side in (-1, 1):
        r = np.clip(6.0 + 0.18 * (10.0 - cv.z), 1.0, None)
        psoas = ((cv.x - side * (30 + 0.08 * np.clip(-cv.z, 0, None))) / r) ** 2 + (
            (cv.y - y0) / (0.85 * r)
        ) ** 2
        cv.tissue[(psoas < 1) & (cv.z < 10)] = _CODE["muscle"]
    vb = (cv.x / rx) ** 2 + ((cv.y - y0) / ry) ** 2
    cv.tissue[(vb < 1) & ~is_disc] = _CODE["cortical"]
    cv.tissue[(vb < 0.72) & ~is_disc] = _CODE["cancellous"]
    cv.tissue[(vb < 1) & is_disc] = _CODE["disc"]
    yc = y0 + ry + 10.0
    r_canal = np.sqrt(cv.x**2 + (cv.y - yc) ** 2)
    arch = (r_canal < 14.5) & (cv.y > yc - 3.0)
    spinous = (np.abs(cv.x) < 4.0) & (cv.y > yc) & (cv.y < yc + 30.0)
    transverse = (np.abs(cv.x) > 12.0) & (np.abs(cv.x) < 40.0) & (np.abs(cv.y - (yc - 4.0)) < 4.0)
    transverse &= np.abs(levels - disc - (period - disc) / 2) < 6.0
    cv.tissue[(arch | spinous | transverse) & ~is_disc] = _CODE["cortical"]
    cv.tissue[r_canal < 9.0] = _CODE["canal"]


def _paint_bowel(cv: _Canvas, body: _Body, rng: np.random.Generator) -> None:
    """Unlabelled bowel loops and colon (wall + gas, fluid or feces) filling the lower abdomen."""
    loops = [
        (body.at(rng.uniform(-110, 15), rng.uniform(-70, 10), rng.uniform(-90, 90)), 10, 18)
        for _ in range(14)
    ]
    for side, top in ((-1, rng.uniform(-20, 10)), (1, rng.uniform(0, 35))):
        for z in np.arange(-110.0, top, 14.0):
            loops.append((body.at(z, 5 + 10 * (side > 0), side * 95), 16, 21))
    for center, lo, hi in loops:
        axes = tuple(float(rng.uniform(lo, hi)) for _ in range(3))
        sl, inside, q, _ = cv.ellipsoid(center, axes, _rotation(rng, 40), lobulation=0.1)
        inside &= body.cavity[sl]
        content = ("bowel gas", "bowel fluid", "feces")[int(rng.choice(3, p=(0.3, 0.35, 0.35)))]
        cv.paint(sl, inside, "bowel wall")
        cv.paint(sl, inside & (q < 0.6), content)


def _paint_chest(cv: _Canvas, body: _Body, rng: np.random.Generator) -> None:
    """Lung bases above the diaphragm and the heart's inferior border between them."""
    _, y_spine, _ = body.at(0, 46, 0)
    mediastinum = (np.abs(cv.x) < 28 * body.kx) & (cv.y < y_spine)
    spine = (cv.x / 24) ** 2 + ((cv.y - y_spine) / 22) ** 2 < 1
    lungs = body.cavity & (cv.z > body.dome) & ~mediastinum & ~spine
    cv.tissue[lungs] = _CODE["lung"]
    center = body.at(rng.uniform(112, 125), -28, 18)
    sl, inside, _, _ = cv.ellipsoid(center, _sizes(rng, (50, 52, 68)), _rotation(rng, 10))
    inside &= (cv.z[sl] > body.dome[sl]) & body.cavity[sl]
    cv.paint(sl, inside, "heart")


def _paint_organs(cv: _Canvas, body: _Body, rng: np.random.Generator, gallbladder: bool) -> None:
    """Stomach, liver, gallbladder, spleen, pancreas, kidneys, IVC and aorta, in painting order."""
    below = body.cavity & (cv.z < body.dome - 4.0)

    # stomach: wall, fluid and (anterior, non-dependent) gas
    center = body.at(*_jitter(rng, (38, -30, 62)))
    rot = _rotation(rng, rng.uniform(20, 40), "z") @ _rotation(rng, 10)
    sl, inside, q, u = cv.ellipsoid(center, _sizes(rng, (44, 34, 40)), rot, lobulation=0.08)
    inside &= below[sl]
    cv.paint(sl, inside, "stomach wall")
    lumen = inside & (q < 0.78)
    cv.paint(sl, lumen, "stomach fluid")
    cv.paint(sl, lumen & (cv.y[sl] < center[1] - rng.uniform(8, 18)), "stomach gas")

    # liver: right and left lobe ellipsoids; sub-location by the falciform plane
    falciform_x = -10.0 * body.kx + rng.uniform(-5, 5)
    for nominal, axes in (((40, 0, -62), (62, 72, 62)), ((55, -40, 5), (38, 38, 55))):
        center = body.at(*_jitter(rng, nominal))
        sl, inside, _, _ = cv.ellipsoid(center, _sizes(rng, axes), _rotation(rng, 8), lobulation=0.07)
        inside &= below[sl]
        cv.paint(sl, inside, "liver", subloc=(cv.x[sl] >= falciform_x).astype(np.uint8))

    if gallbladder:
        center = body.at(*_jitter(rng, (0, -38, -42), 4))
        rot = _rotation(rng, rng.uniform(-35, -15), "x")
        axes = _sizes(rng, (36, 15, 16), 0.1)
        sl, inside, _, u = cv.ellipsoid(center, axes, rot, lobulation=0.04)
        inside &= below[sl]
        # the fundus is the inferior end of the long axis, the neck the superior end
        cv.paint(
            sl, inside, "gallbladder", subloc=np.digitize(u[0] / axes[0], (-1 / 3, 1 / 3)).astype(np.uint8)
        )

    # spleen: long axis along the posterolateral ribs
    center = body.at(*_jitter(rng, (42, 45, 82)))
    rot = _rotation(rng, rng.uniform(-50, -30), "z") @ _rotation(rng, 10)
    sl, inside, _, _ = cv.ellipsoid(center, _sizes(rng, (52, 48, 25)), rot, lobulation=0.08)
    inside &= below[sl]
    cv.paint(sl, inside, "spleen", subloc=(cv.z[sl] < center[0]).astype(np.uint8))

    _paint_pancreas(cv, body, rng, below)

    # kidneys: cortex, medulla, sinus fat, collecting system; the right one lower; upper poles medial
    for side, name, z_nominal in ((-1, "right", -22.0), (1, "left", -8.0)):
        center = body.at(*_jitter(rng, (z_nominal, 48, side * 60)))
        rot = _rotation(rng, side * rng.uniform(8, 20), "y") @ _rotation(rng, 8)
        axes = _sizes(rng, (52, 26, 27))
        sl, inside, q, u = cv.ellipsoid(center, axes, rot, lobulation=0.03)
        inside &= body.cavity[sl]
        t = u[0] / axes[0]
        pole = np.digitize(-t, (-0.3, 0.3)).astype(np.uint8)
        medial = -side * u[2] / axes[2]
        cv.paint(sl, inside, f"{name} cortex", subloc=pole)
        cv.paint(sl, inside & (q < 0.55), f"{name} medulla")
        cv.paint(sl, inside & (q < 0.45) & (medial > 0.0), f"{name} sinus")
        cv.paint(sl, inside & (q < 0.18) & (medial > 0.2), f"{name} collecting")

    # great vessels: IVC to the right, aorta to the left, anterior to the spine (drawn over the liver)
    for tissue, nominal_x, ry, rx in (("ivc", -24.0, 9.0, 13.0), ("aorta", 14.0, 11.0, 11.0)):
        _, yv, xv = body.at(0, 18, nominal_x)
        ry, rx = _sizes(rng, (ry, rx), 0.1)[:2]
        tube = ((cv.x - xv - 0.03 * cv.z) / rx) ** 2 + ((cv.y - yv) / ry) ** 2 < 1
        cv.tissue[tube & (cv.z < body.dome + (40 if tissue == "ivc" else 200))] = _CODE[tissue]


def _paint_pancreas(cv: _Canvas, body: _Body, rng: np.random.Generator, below: np.ndarray) -> None:
    """A capsule chain head -> neck -> body -> tail (toward the splenic hilum); sub-location = segment."""
    nodes = [body.at(*_jitter(rng, p, 4)) for p in ((-12, -2, -32), (0, -14, -4), (6, -4, 32), (14, 28, 72))]
    radii = [r * rng.uniform(0.9, 1.1) for r in (16.0, 11.0, 11.0, 9.0)]
    center = np.mean(nodes, axis=0)
    extent = np.max(np.abs(np.array(nodes) - center), axis=0) + max(radii)
    sl = cv.box(center, extent)
    best = np.full(cv.tissue[sl].shape, np.inf, dtype=np.float32)
    segment = np.zeros(best.shape, dtype=np.uint8)
    p = (cv.z[sl], cv.y[sl], cv.x[sl])
    for k in range(3):
        a, b = np.array(nodes[k]), np.array(nodes[k + 1])
        ab = b - a
        t = np.clip(sum((p[i] - a[i]) * ab[i] for i in range(3)) / float(ab @ ab), 0.0, 1.0)
        dist = np.sqrt(sum((p[i] - a[i] - t * ab[i]) ** 2 for i in range(3)))
        score = dist / (radii[k] + t * (radii[k + 1] - radii[k]))
        closer = score < best
        best[closer], segment[closer] = score[closer], k
    inside = (best < 1.0 + 0.12 * cv.lobes[sl]) & below[sl]
    cv.paint(sl, inside, "pancreas", subloc=segment)


# --------------------------------------------------------------------------------------------
# Findings and lesions.
def _draw_plan(
    rng: np.random.Generator, gallbladder: bool, min_mm: float
) -> list[tuple[str, str, int, float]]:
    """(organ, kind, sub-location index, diameter mm) for 0-3 lesions, at most one per organ."""
    count = int(rng.choice(4, p=_NUM_LESIONS_P))
    organs = [o for o in _LESION_ORGAN_WEIGHTS if gallbladder or o != "gallbladder"]
    weights = np.array([_LESION_ORGAN_WEIGHTS[o] for o in organs])
    chosen = rng.choice(len(organs), size=count, replace=False, p=weights / weights.sum())
    plan = []
    for index in sorted(int(i) for i in chosen):
        organ = organs[index]
        kind = LESION_ORGAN_KINDS[organ][int(rng.integers(len(LESION_ORGAN_KINDS[organ])))]
        sub = int(rng.integers(len(SUBLOCATIONS[organ])))
        lo, hi = _SIZE_RANGE_MM[kind]
        size = max(min_mm, rng.uniform(lo, min(hi, _ORGAN_MAX_LESION_MM[organ])))
        plan.append((organ, kind, sub, float(size)))
    return plan


def _lesion_hu(kind: str, organ: str, phase: int, rng: np.random.Generator) -> float:
    host = _HU_LUT[:, _CODE[_HOST_TISSUE[organ]]]
    if kind == "cyst":
        return rng.uniform(2, 16)
    if kind in ("calcification", "stone"):
        return rng.uniform(350, 1100)
    base = host[0] - 15.0
    hypervascular = organ in ("liver", "right kidney", "left kidney")
    gain = (0.0, 1.5, 0.7, 0.65)[phase] if hypervascular else 0.5
    return base + gain * (host[phase] - host[0]) + rng.uniform(-8, 8)


def _attenuation(kind: str, organ: str, phase: int, hu: float) -> str:
    """A noun phrase for the lesion's attenuation relative to its organ in this phase ("... of {it}")."""
    if kind == "cyst":
        return "non-enhancing fluid attenuation"
    if kind in ("calcification", "stone"):
        return "calcific density"
    host = float(_HU_LUT[phase, _CODE[_HOST_TISSUE[organ]]])
    relation = "hyper" if hu > host + 15 else "hypo" if hu < host - 15 else "iso"
    return f"{relation}attenuating soft tissue" if phase == 0 else f"{relation}enhancing soft tissue"


def _has_cube(mask: np.ndarray) -> bool:
    """True if ``mask`` contains a full 2 x 2 x 2 block of voxels."""
    if min(mask.shape) < 2:
        return False
    block = mask[:-1, :-1, :-1].copy()
    for dz, dy, dx in [(a, b, c) for a in (0, 1) for b in (0, 1) for c in (0, 1)][1:]:
        block &= mask[dz : dz + mask.shape[0] - 1, dy : dy + mask.shape[1] - 1, dx : dx + mask.shape[2] - 1]
    return bool(block.any())


def _fit_lesion(cv: _Canvas, candidates, organ_mask, lesion_map, kind: str, diameter: float, rng):
    """Try up to 40 candidate centres; return (box, mask) of a lesion that lies >= 80 % in its organ.

    The lesion must hold a 2 x 2 x 2 voxel block: then a nearest-neighbour resize that shrinks each
    axis by at most 2 (every scale's raw -> prepared shape) keeps at least one of its voxels.
    """
    if not len(candidates):
        return None
    for index in rng.choice(len(candidates), size=min(40, len(candidates)), replace=False):
        z, y, x = candidates[index]
        center = (float(cv.z[z, y, x]), float(cv.y[z, y, x]), float(cv.x[z, y, x]))
        r = diameter / 2
        axes = (r, r * rng.uniform(0.75, 1.0), r * rng.uniform(0.75, 1.0))
        lobulation = 0.12 if kind == "solid mass" else 0.04
        sl, inside, _, _ = cv.ellipsoid(center, axes, _rotation(rng, 90), lobulation=lobulation)
        kept = inside & organ_mask[sl] & (lesion_map[sl] == 0)
        if inside.any() and kept.sum() >= 0.8 * inside.sum() and _has_cube(kept):
            return sl, kept
    return None


def _place_lesions(cv: _Canvas, plan, phase: int, rng: np.random.Generator, min_mm: float):
    """Paint planned lesions inside their organ and sub-location; return (Lesions, lesion map, HU list)."""
    labels = _LABEL_LUT[cv.tissue]
    lesion_map = np.zeros(cv.shape, dtype=np.uint8)
    lesions, hus = [], []
    for organ, kind, sub, size in plan:
        organ_mask = labels == ORGAN_LABELS[organ]
        allowed = organ_mask & (cv.subloc == sub)
        if kind == "stone" and organ != "gallbladder":
            side = organ.split()[0]
            allowed &= np.isin(cv.tissue, [_CODE[f"{side} sinus"], _CODE[f"{side} collecting"]])
        candidates = np.argwhere(allowed)
        placed = None
        for diameter in [size * 0.85**k for k in range(8) if size * 0.85**k >= min_mm] or [min_mm]:
            placed = _fit_lesion(cv, candidates, organ_mask, lesion_map, kind, diameter, rng)
            if placed is not None:
                break
        if placed is None:
            continue
        lesion_id = len(lesions) + 1
        lesion_map[placed[0]][placed[1]] = lesion_id
        hu = _lesion_hu(kind, organ, phase, rng)
        sublocation = SUBLOCATIONS[organ][sub]
        attenuation = _attenuation(kind, organ, phase, hu)
        lesions.append(Lesion(lesion_id, kind, organ, sublocation, round(diameter), attenuation, round(hu)))
        hus.append(hu)
    return lesions, lesion_map, hus


def _partial_volume(volume: np.ndarray) -> np.ndarray:
    """Soften edges as a scanner's point spread does: a [1, 4, 1] / 6 filter along each axis."""
    for axis in range(3):
        padded = np.concatenate([volume.take([0], axis), volume, volume.take([-1], axis)], axis=axis)
        n = volume.shape[axis]
        volume = (
            padded.take(range(0, n), axis)
            + 4 * padded.take(range(1, n + 1), axis)
            + padded.take(range(2, n + 2), axis)
        ) / 6
    return volume


def make_case(case_id: str, seed: int, raw_shape, raw_spacing, *, phase: str | None = None) -> PhantomCase:
    """Generate case ``case_id`` from ``seed`` on a ``raw_shape`` (z, y, x) grid of ``raw_spacing`` mm.

    The same seed gives identical arrays and findings on the same grid. ``phase`` (one of
    :data:`PHASES`) replaces the drawn contrast phase, e.g. to show one patient in every phase.
    """
    raw_shape = tuple(int(n) for n in raw_shape)
    raw_spacing = tuple(float(s) for s in raw_spacing)
    if len(raw_shape) != 3 or min(raw_shape) < 8:
        raise ValueError(f"raw_shape must be 3 ints >= 8 (z, y, x), got {raw_shape}")
    if len(raw_spacing) != 3 or min(raw_spacing) <= 0:
        raise ValueError(f"raw_spacing must be 3 positive mm values (z, y, x), got {raw_spacing}")
    rng_findings, rng_anatomy, rng_place, rng_noise = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4)
    )
    phase_index = int(rng_findings.choice(4, p=_PHASE_P))
    if phase is not None:
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}: expected one of {', '.join(PHASES)}")
        phase_index = PHASES.index(phase)
    plane = PLANES[int(rng_findings.choice(3, p=_PLANE_P))]
    window = WINDOW_NAMES[int(rng_findings.choice(3, p=_WINDOW_P))]
    gallbladder = bool(rng_findings.random() >= _CHOLECYSTECTOMY_P)
    min_mm = max(MIN_LESION_MM, 3 * max(raw_spacing))
    plan = _draw_plan(rng_findings, gallbladder, min_mm)

    cv = _Canvas(raw_shape, raw_spacing, rng_noise)
    body = _paint_body(cv, rng_anatomy)
    _paint_spine(cv, body, rng_anatomy)
    _paint_bowel(cv, body, rng_anatomy)
    _paint_chest(cv, body, rng_anatomy)
    _paint_organs(cv, body, rng_anatomy, gallbladder)
    lesions, lesion_map, lesion_hus = _place_lesions(cv, plan, phase_index, rng_place, min_mm)

    hu = _HU_LUT[phase_index][cv.tissue] + _TEX_LUT[cv.tissue] * cv.texture
    for lesion, mean_hu in zip(lesions, lesion_hus, strict=True):
        inside = lesion_map == lesion.lesion_id
        spread = {"cyst": 3.0, "solid mass": 14.0}.get(lesion.kind, 60.0)
        hu[inside] = mean_hu + spread * cv.texture[inside]
    hu = _partial_volume(hu)
    hu += rng_noise.standard_normal(raw_shape, dtype=np.float32) * NOISE_HU
    np.clip(hu, -1024, 3071, out=hu)

    organ_labels = _LABEL_LUT[cv.tissue]
    present = tuple(name for label, name in ORGANS.items() if (organ_labels == label).any())
    findings = Findings(case_id, PHASES[phase_index], plane, window, present, tuple(lesions))
    return PhantomCase(case_id, hu.astype(np.float32), raw_spacing, organ_labels, lesion_map, findings)


def series_name(findings: Findings) -> str:
    """M3D-Cap series folder-style name, e.g. ``Axial_portal_venous_soft_tissue_window``."""
    words = f"{findings.plane} {findings.phase} {findings.window} window".replace("-", " ").split()
    return "_".join([words[0].capitalize(), *words[1:]])


def reslice(volume: np.ndarray, plane: str) -> np.ndarray:
    """The volume as seen in acquisition ``plane``: D becomes the plane's normal.

    axial: (z, y, x) as is; coronal: (y, z, x) with superior at row 0; sagittal: (x, z, y) with
    superior at row 0 and anterior at column 0 (the usual display orientations).
    """
    if volume.ndim != 3:
        raise ValueError(f"reslice expects a D x H x W volume, got shape {volume.shape}")
    if plane == "axial":
        return volume
    if plane == "coronal":
        return np.ascontiguousarray(volume.transpose(1, 0, 2)[:, ::-1, :])
    if plane == "sagittal":
        return np.ascontiguousarray(volume.transpose(2, 0, 1)[:, ::-1, :])
    raise ValueError(f"unknown plane {plane!r}: expected one of {', '.join(PLANES)}")
