"""Seeded 3D anthropomorphic CT phantoms in HU (abdomen, thorax, head).

Every structure is a 3D object (an ellipsoid, a tube, or an elliptic cylinder whose
cross-section varies smoothly along z), drawn slice by slice with a one-pixel
anti-aliased edge, so adjacent slices are strongly correlated as in real thin-slice CT.
Soft tissues carry band-limited correlated texture (a few HU), lungs a stronger
parenchymal texture, trabecular bone a coarse one.  HU values follow textbook
non-contrast / portal-venous values: air -1000, lung ~ -850, fat ~ -100, water 0,
CSF ~ 5, kidney ~ 35, brain 28-40, muscle ~ 50, spleen ~ 50, liver ~ 60,
contrast blood 150-250, trabecular bone 200-400, cortical bone 1000-1500.

Coordinates: mm, isocentre at the volume centre, x to the image right (column index),
y up = anterior (row 0 is anterior), z along the slice index.  Arrays are (z, y, x).
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
from scipy import ndimage

KINDS = ("abdomen", "thorax", "head")
DEFAULT_FOV_MM = {"abdomen": 380.0, "thorax": 400.0, "head": 250.0}


class _Slice:
    """One axial slice being painted (HU image + coordinate axes in mm)."""

    def __init__(self, size: int, pixel_mm: float, z: float, fill: float = -1000.0):
        self.size = size
        self.px = pixel_mm
        self.z = z
        c = (np.arange(size) - (size - 1) / 2.0) * pixel_mm
        self.xs = c.astype(np.float32)            # column -> x
        self.ys = (-c).astype(np.float32)         # row -> y (row 0 anterior)
        self.img = np.full((size, size), fill, np.float32)

    def _bbox(self, cx, cy, r):
        px = self.px
        half = (self.size - 1) / 2.0
        c0 = int(max(0, math.floor((cx - r) / px + half) - 1))
        c1 = int(min(self.size, math.ceil((cx + r) / px + half) + 2))
        r0 = int(max(0, math.floor((-cy - r) / px + half) - 1))
        r1 = int(min(self.size, math.ceil((-cy + r) / px + half) + 2))
        return r0, r1, c0, c1

    def mask(self, cx, cy, a, b, theta=0.0, mods=None, ring=None):
        """Anti-aliased mask of a (Fourier-modulated) ellipse; returns (slices, weights).

        mods: list of (k, amplitude, phase) radius modulations r(phi) = 1 + sum amp cos(k phi + p).
        ring: thickness (mm) -> only the shell of that thickness inside the boundary.
        """
        if a <= 0 or b <= 0:
            return None
        amp = sum(abs(m[1]) for m in mods) if mods else 0.0
        r = max(a, b) * (1 + amp)
        r0, r1, c0, c1 = self._bbox(cx, cy, r)
        if r0 >= r1 or c0 >= c1:
            return None
        X = self.xs[None, c0:c1] - cx
        Y = self.ys[r0:r1, None] - cy
        if theta:
            ct, st = math.cos(theta), math.sin(theta)
            X, Y = X * ct + Y * st, -X * st + Y * ct
        rho = np.sqrt((X / a) ** 2 + (Y / b) ** 2)
        if mods:
            phi = np.arctan2(Y / b, X / a)
            rad = np.ones_like(phi)
            for k, am, ph in mods:
                rad += am * np.cos(k * phi + ph)
            rho = rho / rad
        scale = min(a, b)
        d = (rho - 1.0) * scale  # ~signed distance in mm (negative inside)
        w = np.clip(0.5 - d / self.px, 0.0, 1.0)
        if ring is not None:
            w_in = np.clip(0.5 - (d + ring) / self.px, 0.0, 1.0)
            w = w - w_in
        return (slice(r0, r1), slice(c0, c1)), w

    def paint(self, value, *args, within=None, **kw):
        m = self.mask(*args, **kw)
        if m is None:
            return None
        sl, w = m
        if within is not None:
            w = w * within[sl]
        if np.isscalar(value):
            self.img[sl] += w * (value - self.img[sl])
        else:
            self.img[sl] += w * (value[sl] - self.img[sl])
        return m

    def full_mask(self, *args, **kw):
        out = np.zeros_like(self.img)
        m = self.mask(*args, **kw)
        if m is not None:
            out[m[0]] = m[1]
        return out

    def tube(self, p0, p1, radius, value, within=None):
        """Paint the intersection of a 3D capsule (segment p0-p1, radius) with this slice."""
        p0 = np.asarray(p0, float)
        p1 = np.asarray(p1, float)
        zmin, zmax = min(p0[2], p1[2]) - radius, max(p0[2], p1[2]) + radius
        if not (zmin <= self.z <= zmax):
            return
        lo = np.minimum(p0[:2], p1[:2]) - radius
        hi = np.maximum(p0[:2], p1[:2]) + radius
        cx, cy = (lo + hi) / 2
        r = float(max(hi - lo) / 2)
        r0, r1, c0, c1 = self._bbox(cx, cy, r)
        if r0 >= r1 or c0 >= c1:
            return
        X = self.xs[None, c0:c1]
        Y = self.ys[r0:r1, None]
        d = p1 - p0
        L2 = float(d @ d) + 1e-9
        t = ((X - p0[0]) * d[0] + (Y - p0[1]) * d[1] + (self.z - p0[2]) * d[2]) / L2
        t = np.clip(t, 0, 1)
        dist = np.sqrt((X - p0[0] - t * d[0]) ** 2 + (Y - p0[1] - t * d[1]) ** 2
                       + (self.z - p0[2] - t * d[2]) ** 2)
        w = np.clip(0.5 - (dist - radius) / self.px, 0.0, 1.0)
        sl = (slice(r0, r1), slice(c0, c1))
        if within is not None:
            w = w * within[sl]
        self.img[sl] += w * (value - self.img[sl])


def _ellipsoid_factor(z, zc, hz):
    """Cross-section scale of an ellipsoid of half-length hz centred at zc (0 outside)."""
    u = (z - zc) / hz
    return math.sqrt(max(0.0, 1.0 - u * u))


def _mods(rng, kmax=4, amp=0.03):
    return [(k, float(rng.uniform(0.3, 1.0) * amp / k ** 0.5), float(rng.uniform(0, 2 * np.pi)))
            for k in range(2, kmax + 1)]


def _draw_wave(rng, amp, period=(60.0, 140.0)) -> tuple[float, float, float]:
    """(amplitude, period mm, phase) of a slow drift along the body axis, drawn once per volume.

    Drawn once, not per slice: redrawing them for every slice made the body outline jump by
    up to ~3 mm between 1 mm slices, which no real anatomy does and which left the adjacent
    slices that CLEAR-Net reads as context with little to offer.
    """
    return float(amp), float(rng.uniform(*period)), float(rng.uniform(0, 2 * np.pi))


def _wave(z, wave: tuple[float, float, float]) -> float:
    """The drift of :func:`_draw_wave` at height z (mm): smooth in z."""
    amp, period, phase = wave
    return amp * math.sin(2 * math.pi * z / period + phase)


def _vessel_tree(rng, root, direction, length, radius, depth, out):
    """Random 3D branching tree of capsules appended to ``out`` as (p0, p1, r)."""
    if depth == 0 or radius < 0.6:
        return
    direction = direction / np.linalg.norm(direction)
    p1 = root + direction * length
    out.append((root, p1, radius))
    for _ in range(2):
        nd = direction + rng.normal(0, 0.55, 3)
        _vessel_tree(rng, p1, nd, length * rng.uniform(0.65, 0.85),
                     radius * rng.uniform(0.65, 0.8), depth - 1, out)


def _texture(shape, rng, sigmas):
    """Unit-variance band-limited Gaussian random field."""
    n = rng.standard_normal(shape).astype(np.float32)
    f = ndimage.gaussian_filter(n, sigmas, mode="wrap")
    f /= max(float(f.std()), 1e-6)
    return f


# ---------------------------------------------------------------------------------------
# anatomy
# ---------------------------------------------------------------------------------------

class _Anatomy:
    def __init__(self, rng, kind):
        self.rng = rng
        self.kind = kind
        r = rng
        self.z0 = float(r.uniform(-30, 30))  # which anatomical level the stack is centred on
        if kind == "head":
            self.a, self.b = r.uniform(68, 78), r.uniform(85, 97)
        elif kind == "thorax":
            self.a, self.b = r.uniform(150, 178), r.uniform(100, 122)
        else:
            self.a, self.b = r.uniform(140, 170), r.uniform(100, 120)
        self.body_mods = _mods(r, 5, 0.05)
        self.body_cy = float(r.uniform(-5, 5))
        self.fat_mm = float(r.uniform(8, 30))
        self.muscle_mm = float(r.uniform(10, 18))
        self.params = {}

    @property
    def max_radius_mm(self) -> float:
        amp = sum(abs(m[1]) for m in self.body_mods)
        return max(self.a, self.b) * (1 + amp) * 1.06 + abs(self.body_cy)


def _body_outline(S, A, z, r_scale):
    a = A.a * r_scale
    b = A.b * r_scale
    cy = A.body_cy
    # skin + subcutaneous fat
    S.paint(-100.0 + A.params.setdefault("fat_hu", float(A.rng.uniform(-15, 10))),
            0, cy, a, b, mods=A.body_mods)
    S.paint(40.0, 0, cy, a, b, mods=A.body_mods, ring=1.8)  # skin
    return a, b, cy


def _vertebra(A) -> dict:
    """The volume's vertebra (size, disc spacing, bone HU), drawn on first use."""
    r = A.params
    if "vert" not in r:
        rng = A.rng
        r["vert"] = dict(period=float(rng.uniform(26, 32)), phase=float(rng.uniform(0, 30)),
                         body_r=float(rng.uniform(16, 21)), trab=float(rng.uniform(200, 320)),
                         cort=float(rng.uniform(1000, 1400)))
    return r["vert"]


#: how far behind the vertebral body's centre the spine (spinous process) and the paraspinal
#: muscles reach, in mm, beyond its 0.85 x radius, and the fat kept between them and the skin
_NEURAL_ARCH_MM, _PARASPINAL_MM, _FAT_BEHIND_SPINE_MM = 38.5, 53.0, 5.0


def _spine_centre_y(A, cy: float, b: float, bi: float, usual_mm: float) -> float:
    """y of the vertebral body's centre: ``usual_mm`` in front of the muscle wall's back edge
    (``cy - bi``), or further forward in a thin patient, so that the spinous process and the
    paraspinal muscles stay under the skin (the body outline's own bumps counted): with only
    8-12 mm of fat they reached through it into the air behind the back."""
    phi = -math.pi / 2 + np.linspace(-0.35, 0.35, 15)  # the back, across the spine and its muscles
    radius = 1.0 + sum(am * np.cos(k * phi + ph) for k, am, ph in A.body_mods)
    skin_y = cy - b * float(radius.min())
    reach = max(0.85 * _vertebra(A)["body_r"] + _NEURAL_ARCH_MM, _PARASPINAL_MM)
    return max(cy - bi + usual_mm, skin_y + reach + _FAT_BEHIND_SPINE_MM)


def _spine(S, A, z, cx, cy, scale=1.0):
    v = _vertebra(A)
    zz = (z + v["phase"]) % v["period"]
    disc = zz < 5.0
    br = v["body_r"] * scale
    if disc:
        S.paint(85.0, cx, cy, br * 1.05, br * 0.9)
    else:
        S.paint(v["cort"], cx, cy, br, br * 0.85)
        S.paint(v["trab"] + A.tex_bone, cx, cy, br - 2.2, br * 0.85 - 2.2)
    # pedicles / lamina / spinous process (neural arch), canal with cord
    ccy = cy - br * 0.85 - 8.5 * scale
    S.paint(v["cort"] * 0.8, cx, ccy, 15 * scale, 11 * scale)
    S.paint(v["trab"], cx, ccy, 12.5 * scale, 8.5 * scale)
    S.paint(v["cort"] * 0.8, cx, ccy - 16 * scale, 4 * scale, 14 * scale)
    S.paint(10.0, cx, ccy + 1, 8.5 * scale, 7 * scale)   # canal (CSF)
    S.paint(35.0, cx, ccy + 1, 5 * scale, 4.2 * scale)   # cord
    if not disc:  # transverse processes
        for sgn in (-1, 1):
            S.paint(v["cort"] * 0.8, cx + sgn * 20 * scale, ccy + 2, 12 * scale, 4 * scale,
                    theta=sgn * 0.25)
    return ccy


def _abdomen_slice(S, A, z):
    zr = z + A.z0
    a, b, cy = _body_outline(S, A, z, 1.0 + _wave(zr, A.outline_wave))
    # muscle wall and peritoneal cavity (intra-abdominal fat)
    ai, bi = a - A.fat_mm, b - A.fat_mm * 0.8
    S.paint(50.0 + A.tex_soft, 0, cy, ai, bi, mods=A.body_mods)
    S.paint(-85.0 + A.tex_fat, 0, cy + 4, ai - A.muscle_mm, bi - A.muscle_mm * 0.9,
            mods=A.body_mods)
    # ribs (lower costal margin), laterally in the muscle wall
    for k, ang in enumerate(A.rib_angles):
        ang = ang + 0.004 * zr
        rx, ry = (ai - 6) * math.cos(ang), cy + (bi - 6) * math.sin(ang)
        if abs(math.sin(ang)) < 0.93:
            S.paint(900.0, rx, ry, 5.0, 7.5, theta=ang)
            S.paint(300.0, rx, ry, 3.0, 5.0, theta=ang)
    # spine + paraspinal + psoas muscles
    scy = _spine_centre_y(A, cy, b, bi, 48.0)
    for sgn in (-1, 1):
        S.paint(50.0 + A.tex_soft, sgn * 30, scy - 30, 26, 22, theta=sgn * 0.3)
        S.paint(48.0 + A.tex_soft, sgn * 36, scy + 6, 14 + 0.08 * max(0, -zr), 16)
    _spine(S, A, zr, 0, scy)
    # liver (patient right = image left), with portal/hepatic vessels and lesions
    lf = _ellipsoid_factor(zr, 35, 140)
    S.paint(60.0 + A.liver_hu + A.tex_soft, -0.30 * a, cy + 0.05 * b,
            0.55 * ai * lf, 0.72 * bi * lf, theta=0.25, mods=A.liver_mods)
    liver_m = S.full_mask(-0.30 * a, cy + 0.05 * b, 0.55 * ai * lf, 0.72 * bi * lf,
                          theta=0.25, mods=A.liver_mods)
    for seg in A.liver_vessels:
        S.tube(seg[0], seg[1], seg[2], 165.0, within=liver_m)
    # spleen (image right, posterior)
    sf = _ellipsoid_factor(zr, 50, 70)
    S.paint(50.0 + A.tex_soft, 0.55 * ai, scy + 10, 0.22 * ai * sf, 0.38 * bi * sf, theta=-0.6,
            mods=A.spleen_mods)
    spleen_m = S.full_mask(0.55 * ai, scy + 10, 0.22 * ai * sf, 0.38 * bi * sf, theta=-0.6,
                           mods=A.spleen_mods)
    # stomach (anterior left) with gas/fluid
    gf = _ellipsoid_factor(zr, 45, 60)
    if gf > 0:
        S.paint(45.0, 0.25 * a, cy + 0.40 * bi, 48 * gf, 32 * gf, theta=0.3)
        S.paint(A.stomach_content, 0.25 * a, cy + 0.40 * bi, 44 * gf, 28 * gf, theta=0.3)
        S.paint(-1000.0, 0.25 * a, cy + 0.40 * bi + 18 * gf, 30 * gf, 8 * gf, theta=0.3)
    # pancreas band in front of the vessels
    pf = _ellipsoid_factor(zr, 5, 25)
    if pf > 0:
        S.paint(45.0 + A.tex_soft, 0.10 * a, scy + 52, 45 * pf, 9 * pf, theta=0.15)
    # bowel loops (gas / fluid / contrast content), moving smoothly along z
    for (bx, by, br, content, vx, vy) in A.bowel:
        S.paint(40.0, bx + vx * zr, by + vy * zr, br, br * 0.8)
        S.paint(content, bx + vx * zr, by + vy * zr, br - 2.5, br * 0.8 - 2.5)
    # kidneys (cortex, medulla, pelvis)
    for sgn, zc in ((-1, A.kid_z[0]), (1, A.kid_z[1])):
        kf = _ellipsoid_factor(zr, zc, 55)
        if kf > 0:
            kx, ky = sgn * 62, scy + 4
            S.paint(A.kid_hu + A.tex_soft, kx, ky, 30 * kf, 24 * kf, theta=sgn * 0.6)
            S.paint(A.kid_hu - 12, kx, ky, 20 * kf, 15 * kf, theta=sgn * 0.6)
            S.paint(8.0, kx - sgn * 9 * kf, ky + 3, 8 * kf, 6 * kf)
    # aorta (patient left of midline) and IVC (patient right), contrast enhanced
    S.paint(A.aorta_hu, 12, scy + 30, 11.5, 11.5)
    S.paint(A.ivc_hu, -22, scy + 32, 13, 9.5, theta=0.2)
    # portal vein / SMV
    S.paint(A.ivc_hu - 10, -8, scy + 48, 7, 7)
    # lesions
    for (lx, ly, lz, lr, dhu, organ) in A.lesions:
        f = _ellipsoid_factor(zr, lz, lr)
        if f > 0:
            within = liver_m if organ == "liver" else spleen_m
            base = (60.0 + A.liver_hu) if organ == "liver" else 50.0
            S.paint(base + dhu, lx, ly, lr * f, lr * f * 0.85, within=within)


def _thorax_slice(S, A, z):
    zr = z + A.z0
    a, b, cy = _body_outline(S, A, z, 1.0 + _wave(zr, A.outline_wave))
    ai, bi = a - A.fat_mm, b - A.fat_mm * 0.7
    S.paint(50.0 + A.tex_soft, 0, cy, ai, bi, mods=A.body_mods)
    # rib cage: ribs are oval bone sections on the cage ellipse, drifting with z
    cage_a, cage_b = ai - A.muscle_mm, bi - A.muscle_mm * 0.8
    # lungs: inside the cage, both sides of the mediastinum
    lung_masks = []
    for sgn in (-1, 1):
        lx = sgn * 0.48 * cage_a
        la, lb = 0.47 * cage_a, 0.86 * cage_b
        S.paint(-860.0 + A.tex_lung, lx, cy - 2, la, lb, mods=A.lung_mods[sgn])
        lung_masks.append(S.full_mask(lx, cy - 2, la, lb, mods=A.lung_mods[sgn]))
    lung = np.maximum(lung_masks[0], lung_masks[1])
    for seg in A.lung_vessels:
        S.tube(seg[0], seg[1], seg[2], 40.0, within=lung)
    # lesions (nodules) in lungs: small, solid
    for (lx, ly, lz, lr, dhu, organ) in A.lesions:
        f = _ellipsoid_factor(zr, lz, lr)
        if f > 0 and organ == "lung":
            S.paint(30.0 + dhu, lx, ly, lr * f, lr * f, within=lung)
    # mediastinum: fat, heart with blood pools, great vessels
    S.paint(-90.0 + A.tex_fat, 0.05 * a, cy + 0.1 * bi, 0.2 * cage_a, 0.55 * cage_b)
    hf = _ellipsoid_factor(zr, A.heart_z, 75)
    if hf > 0:
        hx, hy = 0.12 * a, cy + 0.12 * bi
        S.paint(40.0 + A.tex_soft, hx, hy, 0.30 * cage_a * hf, 0.45 * cage_b * hf, theta=-0.5)
        S.paint(A.blood_hu, hx + 14 * hf, hy - 6 * hf, 0.13 * cage_a * hf, 0.22 * cage_b * hf,
                theta=-0.5)  # left ventricle
        S.paint(A.blood_hu - 40, hx - 22 * hf, hy + 12 * hf, 0.11 * cage_a * hf,
                0.18 * cage_b * hf, theta=-0.4)  # right ventricle
    else:
        S.paint(A.blood_hu, 0.02 * a + 20, cy + 0.30 * bi, 16, 16)   # ascending aorta
        S.paint(A.blood_hu - 30, 0.02 * a - 8, cy + 0.40 * bi, 14, 13)  # pulmonary trunk / SVC
    scy = _spine_centre_y(A, cy, b, bi, 45.0)
    S.paint(A.blood_hu, 22, scy + 24, 12, 12)   # descending aorta
    S.paint(25.0, -6, scy + 40, 9, 7)           # oesophagus
    S.paint(-1000.0, -6, scy + 40, 3, 2.5)      # its lumen
    if hf == 0 and zr > A.heart_z:
        S.paint(-1000.0, 0, scy + 62, 9, 8)     # trachea
    _spine(S, A, zr, 0, scy)
    for sgn in (-1, 1):
        S.paint(52.0 + A.tex_soft, sgn * 32, scy - 32, 28, 20, theta=sgn * 0.3)
    # ribs
    for ang in A.rib_angles:
        ang2 = ang + 0.012 * zr * (1 if math.sin(ang) > 0 else -1)
        rx = cage_a * 1.02 * math.cos(ang2)
        ry = cy + cage_b * 1.02 * math.sin(ang2)
        S.paint(A.rib_cort, rx, ry, 4.5, 7.0, theta=ang2)
        S.paint(280.0, rx, ry, 2.5, 4.8, theta=ang2)
    # sternum
    S.paint(A.rib_cort, 0, cy + bi - 8, 14, 6)
    S.paint(300.0, 0, cy + bi - 8, 11, 3.5)


def _head_slice(S, A, z):
    zr = z + A.z0
    f = 1.0 + _wave(zr, A.outline_wave) - 0.000025 * zr * zr
    a, b, cy = _body_outline(S, A, z, f)
    # scalp: soft tissue
    S.paint(35.0, 0, cy, a - 1.5, b - 1.5, mods=A.body_mods)
    # skull: outer table / diploe / inner table
    sa, sb = a - A.scalp_mm, b - A.scalp_mm
    S.paint(A.skull_hu, 0, cy, sa, sb, mods=A.body_mods)
    S.paint(A.diploe_hu + A.tex_bone, 0, cy, sa - 2.2, sb - 2.2, mods=A.body_mods)
    S.paint(A.skull_hu, 0, cy, sa - A.skull_mm + 2, sb - A.skull_mm + 2, mods=A.body_mods)
    ia, ib = sa - A.skull_mm, sb - A.skull_mm
    S.paint(8.0, 0, cy, ia, ib, mods=A.body_mods)                    # subarachnoid CSF
    S.paint(38.0 + A.tex_soft, 0, cy, ia - 2.5, ib - 2.5, mods=A.brain_mods)  # grey matter
    S.paint(27.0 + A.tex_soft, 0, cy, (ia - 2.5) * 0.72, (ib - 2.5) * 0.75,
            mods=A.wm_mods)                                          # white matter
    # falx / interhemispheric fissure
    S.paint(12.0, 0, cy + 0.05 * ib, 1.5, ib * 0.85)
    # lateral ventricles (vary with z), third ventricle
    vf = _ellipsoid_factor(zr, A.vent_z, 30)
    if vf > 0:
        for sgn in (-1, 1):
            S.paint(5.0, sgn * (9 + 4 * vf), cy + 12, 5 + 5 * vf, 24 * vf, theta=sgn * 0.25)
        S.paint(5.0, 0, cy - 5, 2.0, 9 * vf)
    # basal ganglia (slightly denser grey) around the ventricles
    bf = _ellipsoid_factor(zr, A.vent_z - 10, 18)
    if bf > 0:
        for sgn in (-1, 1):
            S.paint(40.0 + A.tex_soft, sgn * 24, cy + 5, 9 * bf, 16 * bf, theta=sgn * 0.2)
    # low-contrast lesions, in the brain only (a tall stack's lesion may lie above or below it)
    brain = None
    for (lx, ly, lz, lr, dhu, organ) in A.lesions:
        lf = _ellipsoid_factor(zr, lz, lr)
        if lf > 0:
            if brain is None:
                brain = (S.full_mask(0, cy, ia - 2.5, ib - 2.5, mods=A.brain_mods) > 0).astype(np.float32)
            S.paint(32.0 + dhu, lx, ly, lr * lf, lr * lf * 0.9, within=brain)


def _setup(A: _Anatomy, rng, n_slices, slice_mm):
    kind = A.kind
    A.prng = [np.random.default_rng(rng.integers(1 << 31)) for _ in range(4)]
    A.outline_wave = _draw_wave(A.prng[0], 0.03 if kind == "head" else 0.02)
    A.liver_hu = float(rng.uniform(-8, 8))
    zext = n_slices * slice_mm
    if kind == "abdomen":
        A.liver_mods = _mods(rng, 4, 0.08)
        A.spleen_mods = _mods(rng, 3, 0.08)
        A.kid_hu = float(rng.uniform(30, 40))
        A.kid_z = (float(rng.uniform(-35, -5)), float(rng.uniform(-40, -10)))
        A.aorta_hu = float(rng.uniform(160, 280))
        A.ivc_hu = float(rng.uniform(130, 200))
        A.stomach_content = float(rng.choice([10.0, 20.0, -1000.0]))
        A.rib_angles = [float(t) for t in np.linspace(0, 2 * np.pi, 14, endpoint=False)
                        + rng.uniform(-0.1, 0.1, 14)]
        A.bowel = []
        for _ in range(int(rng.integers(5, 10))):
            ang = rng.uniform(0.15 * np.pi, 0.85 * np.pi)
            rad = rng.uniform(0.2, 0.6)
            A.bowel.append((float(0.5 * A.a * math.cos(ang) * rad * 2 * 0.6 + 0.15 * A.a),
                            float(0.55 * A.b * math.sin(ang) * rad * 1.4 - 0.15 * A.b),
                            float(rng.uniform(8, 15)),
                            float(rng.choice([-1000.0, 15.0, 30.0, 180.0], p=[0.35, 0.35, 0.2, 0.1])),
                            float(rng.uniform(-0.3, 0.3)), float(rng.uniform(-0.3, 0.3))))
        # liver vessels: trees rooted at the hilum
        segs = []
        for _ in range(3):
            root = np.array([-0.2 * A.a, -0.05 * A.b, rng.uniform(-20, 30)])
            _vessel_tree(rng, root, np.array([-1.0, rng.normal(0, 0.5), rng.normal(0, 0.8)]),
                         25.0, 4.5, 4, segs)
        A.liver_vessels = [(p0 - [0, 0, A.z0], p1 - [0, 0, A.z0], r) for p0, p1, r in segs]
        A.lesions = []
        for _ in range(int(rng.integers(2, 5))):
            organ = "liver" if rng.random() < 0.75 else "spleen"
            if organ == "liver":
                lx, ly = -0.32 * A.a + rng.uniform(-30, 30), 0.05 * A.b + rng.uniform(-30, 30)
            else:
                lx, ly = 0.5 * A.a + rng.uniform(-10, 10), -0.2 * A.b + rng.uniform(-10, 10)
            A.lesions.append((float(lx), float(ly), float(A.z0 + rng.uniform(-zext / 2, zext / 2)),
                              float(rng.uniform(3, 9)),
                              float(rng.choice([-1, 1]) * rng.uniform(5, 15)), organ))
    elif kind == "thorax":
        A.lung_mods = {-1: _mods(rng, 4, 0.06), 1: _mods(rng, 4, 0.06)}
        A.blood_hu = float(rng.uniform(150, 250))
        A.heart_z = float(rng.uniform(-60, -20))
        A.rib_cort = float(rng.uniform(900, 1300))
        A.rib_angles = [float(t) for t in np.linspace(0.1, 2 * np.pi - 0.1, 16)
                        if abs(math.sin(t)) < 0.97 and not (-0.9 < math.sin(t) < -0.55
                                                           and abs(math.cos(t)) < 0.35)]
        segs = []
        for sgn in (-1, 1):
            for _ in range(5):
                root = np.array([sgn * 30.0, rng.uniform(-10, 20), rng.uniform(-40, 40)])
                d = np.array([sgn * 1.0, rng.normal(0, 0.7), rng.normal(0, 0.7)])
                _vessel_tree(rng, root, d, 28.0, 5.0, 5, segs)
        A.lung_vessels = [(p0 - [0, 0, A.z0], p1 - [0, 0, A.z0], r) for p0, p1, r in segs]
        A.lesions = []
        for _ in range(int(rng.integers(1, 4))):
            sgn = rng.choice([-1, 1])
            A.lesions.append((float(sgn * rng.uniform(0.3, 0.6) * A.a), float(rng.uniform(-40, 40)),
                              float(A.z0 + rng.uniform(-zext / 2, zext / 2)),
                              float(rng.uniform(2.5, 7)), float(rng.uniform(-15, 15)), "lung"))
    else:  # head
        A.scalp_mm = float(rng.uniform(4, 7))
        A.skull_mm = float(rng.uniform(6, 9))
        A.skull_hu = float(rng.uniform(1200, 1600))
        A.diploe_hu = float(rng.uniform(500, 800))
        A.brain_mods = _mods(rng, 6, 0.03)
        A.wm_mods = _mods(rng, 6, 0.08)
        A.vent_z = float(rng.uniform(-10, 15))
        A.lesions = []
        for _ in range(int(rng.integers(1, 4))):
            A.lesions.append((float(rng.uniform(-40, 40)), float(rng.uniform(-50, 50)),
                              float(A.z0 + rng.uniform(-zext / 2, zext / 2)),
                              float(rng.uniform(3, 8)),
                              float(rng.choice([-1, 1]) * rng.uniform(5, 12)), "brain"))


def make_phantom(kind: str = "abdomen", n_slices: int = 16, size: int = 512,
                 pixel_mm: Optional[float] = None, slice_mm: float = 1.0, seed: int = 0):
    """Seeded anthropomorphic phantom.

    Returns ``(hu, spacing)``: float32 HU volume shaped (n_slices, size, size) in numpy
    (z, y, x) order, row 0 anterior; ``spacing`` = (x, y, z) in mm.
    ``pixel_mm`` defaults to a kind-specific field of view (abdomen 380 mm, thorax 400 mm,
    head 250 mm) divided by ``size``.

    A seed fixes the anatomy for one ``size`` and ``n_slices``: the fat's HU, the vertebrae and
    the lesions' places are drawn after the texture, whose number of draws follows the volume's
    shape, so another size or slice count gives another patient. Kept so: every training set and
    held-out table was simulated this way, and a fresh checkout must simulate them again to the bit.
    """
    kind = str(kind).lower()
    if kind not in KINDS:
        raise ValueError(f"unknown phantom kind {kind!r}; choose one of {', '.join(KINDS)}")
    if int(n_slices) < 1:
        raise ValueError(f"n_slices must be >= 1, got {n_slices}")
    if int(size) < 16:
        raise ValueError(f"size must be >= 16 pixels, got {size}")
    if slice_mm <= 0:
        raise ValueError(f"slice_mm must be > 0, got {slice_mm}")
    size = int(size)
    n_slices = int(n_slices)
    if pixel_mm is None:
        pixel_mm = DEFAULT_FOV_MM[kind] / size
    pixel_mm = float(pixel_mm)
    if pixel_mm <= 0:
        raise ValueError(f"pixel_mm must be > 0, got {pixel_mm}")

    rng = np.random.default_rng([int(seed), KINDS.index(kind)])
    A = _Anatomy(rng, kind)
    fov = size * pixel_mm
    if A.max_radius_mm * 2 > fov * 1.0:
        # shrink the body outline to fit the requested image (keeps the caller's pixel size); the
        # organs keep their size in mm, so only a few per cent (the default fields of view need up
        # to 7 %) leave the anatomy whole: a smaller field of view is refused
        s = fov / (A.max_radius_mm * 2) * 0.98
        if s < 0.9:
            raise ValueError(f"a field of view of {fov:.0f} mm ({size} x {pixel_mm:g} mm) is too small for this "
                             f"{kind} phantom, up to {2 * A.max_radius_mm:.0f} mm across: give pixel_mm >= "
                             f"{0.9 * 2 * A.max_radius_mm / 0.98 / size:.3g}, or leave it to the default")
        A.a *= s
        A.b *= s
    _setup(A, rng, n_slices, slice_mm)

    # correlated textures (shared per volume): smooth in z too (continuity)
    sig_xy = 1.2 / pixel_mm  # ~1.2 mm correlation length
    sig_z = max(0.5, 1.0 / slice_mm)
    shape = (n_slices, size, size)
    tex = _texture(shape, rng, (sig_z, sig_xy, sig_xy))
    tex_lo = _texture(shape, rng, (sig_z * 4, sig_xy * 6, sig_xy * 6))
    zs = (np.arange(n_slices) - (n_slices - 1) / 2.0) * slice_mm
    painter = {"abdomen": _abdomen_slice, "thorax": _thorax_slice, "head": _head_slice}[kind]
    vol = np.empty(shape, np.float32)
    for k, z in enumerate(zs):
        S = _Slice(size, pixel_mm, float(z))
        A.tex_soft = 3.0 * tex[k] + 2.5 * tex_lo[k]
        A.tex_fat = 5.0 * tex[k] + 4.0 * tex_lo[k]
        A.tex_lung = 30.0 * tex[k] + 20.0 * tex_lo[k]
        A.tex_bone = 60.0 * tex[k] + 30.0 * tex_lo[k]
        painter(S, A, float(z))
        vol[k] = S.img
    np.clip(vol, -1024.0, 3071.0, out=vol)
    return vol, (pixel_mm, pixel_mm, float(slice_mm))


def phantom_radius_mm(kind: str, size: int, pixel_mm: Optional[float] = None) -> float:
    """Upper bound of the body radius the phantom can have (for field-of-view checks)."""
    kind = str(kind).lower()
    if pixel_mm is None:
        pixel_mm = DEFAULT_FOV_MM.get(kind, 400.0) / size
    return min(size * pixel_mm / 2.0, {"abdomen": 170 * 1.25, "thorax": 178 * 1.25,
                                       "head": 97 * 1.25}.get(kind, 220.0))
