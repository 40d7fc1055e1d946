//! Plane geometry for the detector's post-processing: convex hulls, minimum-area rectangles,
//! the rounded polygon offset ("unclip"), polygon rasterisation and perspective crops.
//!
//! The behaviour follows what the reference pipeline gets from OpenCV and Clipper (pixel
//! coordinates are pixel centres, Clipper works on integers, crops use bicubic sampling with
//! replicated borders) so that boxes and crops agree with rapidocr to about a pixel.

use image::RgbImage;

pub type Pt = [f64; 2];

fn sub(a: Pt, b: Pt) -> Pt {
    [a[0] - b[0], a[1] - b[1]]
}

fn cross(o: Pt, a: Pt, b: Pt) -> f64 {
    (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])
}

pub fn dist(a: Pt, b: Pt) -> f64 {
    let d = sub(a, b);
    d[0].hypot(d[1])
}

/// Convex hull (Andrew's monotone chain), counter-clockwise in a y-up frame, without
/// collinear points. Fewer than three distinct input points come back as they are (deduplicated).
pub fn convex_hull(points: &[Pt]) -> Vec<Pt> {
    let mut pts: Vec<Pt> = points.to_vec();
    pts.sort_by(|a, b| a[0].total_cmp(&b[0]).then(a[1].total_cmp(&b[1])));
    pts.dedup();
    if pts.len() < 3 {
        return pts;
    }
    let mut hull: Vec<Pt> = Vec::with_capacity(pts.len() * 2);
    for &p in pts.iter().chain(pts.iter().rev().skip(1)) {
        // The lower chain runs over the sorted points, the upper one back over them.
        while hull.len() >= 2 && cross(hull[hull.len() - 2], hull[hull.len() - 1], p) <= 0.0 {
            hull.pop();
        }
        hull.push(p);
    }
    hull.pop(); // the first point closes the loop
    if hull.len() < 3 {
        // All points collinear: keep the two extremes.
        return vec![pts[0], pts[pts.len() - 1]];
    }
    hull
}

/// A rotated rectangle as four corners plus its side lengths.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MinRect {
    pub corners: [Pt; 4],
    pub width: f64,
    pub height: f64,
}

impl MinRect {
    pub fn short_side(&self) -> f64 {
        self.width.min(self.height)
    }

    /// Corners in the reference's "mini box" order: top-left, top-right, bottom-right,
    /// bottom-left, decided by sorting on x and then comparing y within each pair.
    pub fn ordered_corners(&self) -> [Pt; 4] {
        let mut pts = self.corners;
        // A stable sort, like Python's `sorted`.
        pts.sort_by(|a, b| a[0].total_cmp(&b[0]));
        let (tl, bl) = if pts[1][1] > pts[0][1] {
            (pts[0], pts[1])
        } else {
            (pts[1], pts[0])
        };
        let (tr, br) = if pts[3][1] > pts[2][1] {
            (pts[2], pts[3])
        } else {
            (pts[3], pts[2])
        };
        [tl, tr, br, bl]
    }
}

/// Smallest-area enclosing rectangle (rotating calipers over the hull's edges).
/// `None` only for an empty input; degenerate inputs give a zero-width rectangle.
pub fn min_area_rect(points: &[Pt]) -> Option<MinRect> {
    let hull = convex_hull(points);
    match hull.len() {
        0 => None,
        1 => Some(MinRect {
            corners: [hull[0]; 4],
            width: 0.0,
            height: 0.0,
        }),
        2 => {
            let (a, b) = (hull[0], hull[1]);
            Some(MinRect {
                corners: [a, b, b, a],
                width: dist(a, b),
                height: 0.0,
            })
        }
        n => {
            let mut best: Option<(f64, MinRect)> = None;
            for i in 0..n {
                let edge = sub(hull[(i + 1) % n], hull[i]);
                let len = edge[0].hypot(edge[1]);
                if len == 0.0 {
                    continue;
                }
                let u = [edge[0] / len, edge[1] / len];
                let v = [-u[1], u[0]];
                let (mut umin, mut umax, mut vmin, mut vmax) =
                    (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
                for p in &hull {
                    let pu = p[0] * u[0] + p[1] * u[1];
                    let pv = p[0] * v[0] + p[1] * v[1];
                    umin = umin.min(pu);
                    umax = umax.max(pu);
                    vmin = vmin.min(pv);
                    vmax = vmax.max(pv);
                }
                let area = (umax - umin) * (vmax - vmin);
                if best.as_ref().is_none_or(|(a, _)| area < *a) {
                    let at = |a: f64, b: f64| [a * u[0] + b * v[0], a * u[1] + b * v[1]];
                    best = Some((
                        area,
                        MinRect {
                            corners: [
                                at(umin, vmin),
                                at(umax, vmin),
                                at(umax, vmax),
                                at(umin, vmax),
                            ],
                            width: umax - umin,
                            height: vmax - vmin,
                        },
                    ));
                }
            }
            best.map(|(_, r)| r)
        }
    }
}

/// Signed area by the shoelace formula (positive when counter-clockwise in a y-up frame).
pub fn signed_area(poly: &[Pt]) -> f64 {
    let n = poly.len();
    (0..n)
        .map(|i| {
            let (a, b) = (poly[i], poly[(i + 1) % n]);
            a[0] * b[1] - b[0] * a[1]
        })
        .sum::<f64>()
        / 2.0
}

pub fn perimeter(poly: &[Pt]) -> f64 {
    let n = poly.len();
    (0..n).map(|i| dist(poly[i], poly[(i + 1) % n])).sum()
}

/// DB's "unclip": grows a box by `area * ratio / perimeter` with rounded corners.
///
/// Mirrors the reference, which hands float corners to Clipper: Clipper truncates them to
/// integers, approximates each corner arc with a 0.25 px tolerance and rounds its output to
/// integers. The caller takes the minimum-area rectangle of the result, which only depends on
/// the convex hull, so concave corners (possible only after truncating tiny boxes) need not be
/// traced exactly.
pub fn unclip(quad: &[Pt; 4], ratio: f64) -> Vec<Pt> {
    let area = signed_area(quad).abs();
    let length = perimeter(quad);
    if length <= 0.0 {
        return Vec::new();
    }
    let delta = area * ratio / length;

    let mut path: Vec<Pt> = quad.iter().map(|p| [p[0].trunc(), p[1].trunc()]).collect();
    path.dedup();
    while path.len() > 1 && path.first() == path.last() {
        path.pop();
    }
    if path.len() < 3 || delta <= 0.0 {
        return path;
    }
    // Outward normals are (dy, -dx) for positive orientation.
    if signed_area(&path) < 0.0 {
        path.reverse();
    }
    let n = path.len();
    let normals: Vec<Pt> = (0..n)
        .map(|i| {
            let d = sub(path[(i + 1) % n], path[i]);
            let len = d[0].hypot(d[1]);
            [d[1] / len, -d[0] / len]
        })
        .collect();

    let tolerance = 0.25f64.min(delta * 0.25);
    let steps_per_turn =
        (std::f64::consts::PI / (1.0 - tolerance / delta).acos()).min(delta * std::f64::consts::PI);
    let step = std::f64::consts::TAU / steps_per_turn;
    let steps_per_rad = steps_per_turn / std::f64::consts::TAU;
    let at = |p: Pt, nx: f64, ny: f64| [(p[0] + nx * delta).round(), (p[1] + ny * delta).round()];

    let mut out = Vec::new();
    for j in 0..n {
        let k = (j + n - 1) % n;
        let (nk, nj) = (normals[k], normals[j]);
        let sin_a = nk[0] * nj[1] - nj[0] * nk[1];
        let cos_a = nk[0] * nj[0] + nk[1] * nj[1];
        let p = path[j];
        if sin_a < 0.0 {
            // Concave corner: the hull only needs the two offset edge ends.
            out.push(at(p, nk[0], nk[1]));
            out.push(at(p, nj[0], nj[1]));
            continue;
        }
        let angle = sin_a.atan2(cos_a);
        let steps = ((steps_per_rad * angle.abs()).round() as usize).max(1);
        let (mut x, mut y) = (nk[0], nk[1]);
        let (s, c) = step.sin_cos();
        for _ in 0..steps {
            out.push(at(p, x, y));
            (x, y) = (x * c - s * y, x * s + y * c);
        }
        out.push(at(p, nj[0], nj[1]));
    }
    out
}

/// Pixels of the box of a mask, as the reference's `fillPoly` on the box's bounding window:
/// the window is floor/ceil of the float box clipped to the map, and the polygon is the box
/// shifted into that window and truncated to integers. Returns the mean of `map` over the
/// filled pixels (0 when nothing is filled).
pub fn mean_in_polygon(map: &[f32], width: usize, height: usize, poly: &[Pt]) -> f32 {
    if poly.is_empty() || width == 0 || height == 0 {
        return 0.0;
    }
    let clampi = |v: f64, hi: usize| (v as i64).clamp(0, hi as i64 - 1) as usize;
    let xs = poly.iter().map(|p| p[0]);
    let ys = poly.iter().map(|p| p[1]);
    let xmin = clampi(xs.clone().fold(f64::MAX, f64::min).floor(), width);
    let xmax = clampi(xs.fold(f64::MIN, f64::max).ceil(), width);
    let ymin = clampi(ys.clone().fold(f64::MAX, f64::min).floor(), height);
    let ymax = clampi(ys.fold(f64::MIN, f64::max).ceil(), height);
    let local: Vec<Pt> = poly
        .iter()
        .map(|p| [(p[0] - xmin as f64).trunc(), (p[1] - ymin as f64).trunc()])
        .collect();
    let (win_w, win_h) = (xmax - xmin + 1, ymax - ymin + 1);
    let mut sum = 0.0f64;
    let mut count = 0usize;
    for_each_filled_span(&local, win_w, win_h, |y, x0, x1| {
        let row = &map[(y + ymin) * width..];
        for x in x0..=x1 {
            sum += f64::from(row[x + xmin]);
        }
        count += x1 - x0 + 1;
    });
    if count == 0 {
        0.0
    } else {
        (sum / count as f64) as f32
    }
}

/// Calls `span(y, x0, x1)` for every row of a convex integer polygon clipped to a `w`×`h`
/// window, filled as OpenCV's `fillPoly` does: the interior between the edges, plus every pixel
/// of each edge drawn as an 8-connected line (which widens the rows along shallow edges).
fn for_each_filled_span(
    poly: &[Pt],
    w: usize,
    h: usize,
    mut span: impl FnMut(usize, usize, usize),
) {
    let n = poly.len();
    let mut lo = vec![i64::MAX; h];
    let mut hi = vec![i64::MIN; h];
    let mut extend = |y: i64, x: i64| {
        if (0..h as i64).contains(&y) {
            let y = y as usize;
            lo[y] = lo[y].min(x);
            hi[y] = hi[y].max(x);
        }
    };
    for y in 0..h {
        let yf = y as f64;
        let (mut l, mut r) = (f64::MAX, f64::MIN);
        for i in 0..n {
            let (a, b) = (poly[i], poly[(i + 1) % n]);
            if (a[1] <= yf && b[1] >= yf) || (b[1] <= yf && a[1] >= yf) {
                if a[1] == b[1] {
                    l = l.min(a[0].min(b[0]));
                    r = r.max(a[0].max(b[0]));
                } else {
                    let x = a[0] + (yf - a[1]) * (b[0] - a[0]) / (b[1] - a[1]);
                    l = l.min(x);
                    r = r.max(x);
                }
            }
        }
        if r >= l {
            extend(y as i64, l.ceil() as i64);
            extend(y as i64, r.floor() as i64);
        }
    }
    for i in 0..n {
        let (a, b) = (poly[i], poly[(i + 1) % n]);
        let (dx, dy) = (b[0] - a[0], b[1] - a[1]);
        if dx.abs() >= dy.abs() {
            let steps = dx.abs() as i64;
            for k in 0..=steps {
                let t = if steps == 0 {
                    0.0
                } else {
                    k as f64 / steps as f64
                };
                extend((a[1] + t * dy + 0.5).floor() as i64, (a[0] + t * dx) as i64);
            }
        } else {
            let steps = dy.abs() as i64;
            for k in 0..=steps {
                let t = k as f64 / steps as f64;
                extend((a[1] + t * dy) as i64, (a[0] + t * dx + 0.5).floor() as i64);
            }
        }
    }
    for y in 0..h {
        if hi[y] >= lo[y] {
            let x0 = lo[y].max(0);
            let x1 = hi[y].min(w as i64 - 1);
            if x1 >= x0 {
                span(y, x0 as usize, x1 as usize);
            }
        }
    }
}

/// The 3×3 homography (row-major, h33 = 1) that maps each `from[i]` to `to[i]`.
/// `None` when three of the points are collinear.
pub fn perspective_transform(from: &[Pt; 4], to: &[Pt; 4]) -> Option<[f64; 9]> {
    // Unknowns h11..h32; two equations per correspondence.
    let mut a = [[0.0f64; 9]; 8];
    for i in 0..4 {
        let ([x, y], [u, v]) = (from[i], to[i]);
        a[2 * i] = [x, y, 1.0, 0.0, 0.0, 0.0, -x * u, -y * u, u];
        a[2 * i + 1] = [0.0, 0.0, 0.0, x, y, 1.0, -x * v, -y * v, v];
    }
    // Gauss-Jordan with partial pivoting.
    for col in 0..8 {
        let pivot = (col..8).max_by(|&r, &s| a[r][col].abs().total_cmp(&a[s][col].abs()))?;
        if a[pivot][col].abs() < 1e-12 {
            return None;
        }
        a.swap(col, pivot);
        let p = a[col][col];
        for v in &mut a[col][col..] {
            *v /= p;
        }
        let pivot_row = a[col];
        for (r, row) in a.iter_mut().enumerate() {
            let f = row[col];
            if r != col && f != 0.0 {
                for (v, pv) in row[col..].iter_mut().zip(&pivot_row[col..]) {
                    *v -= f * pv;
                }
            }
        }
    }
    let h: Vec<f64> = (0..8).map(|r| a[r][8]).collect();
    Some([h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7], 1.0])
}

/// OpenCV's bicubic kernel (a = -0.75) weights for a fractional offset `t` in [0, 1).
fn cubic_weights(t: f64) -> [f64; 4] {
    const A: f64 = -0.75;
    let w0 = ((A * (t + 1.0) - 5.0 * A) * (t + 1.0) + 8.0 * A) * (t + 1.0) - 4.0 * A;
    let w1 = ((A + 2.0) * t - (A + 3.0)) * t * t + 1.0;
    let w2 = ((A + 2.0) * (1.0 - t) - (A + 3.0)) * (1.0 - t) * (1.0 - t) + 1.0;
    [w0, w1, w2, 1.0 - w0 - w1 - w2]
}

/// Cuts the quadrilateral `quad` (top-left, top-right, bottom-right, bottom-left) out of `img`
/// as an upright rectangle, as the reference's `get_rotate_crop_image`: the output is
/// `int(longest top/bottom edge)` × `int(longest left/right edge)`, sampled bicubically with
/// replicated borders, and turned 90° counter-clockwise when at least 1.5× taller than wide
/// (vertical text). `None` for a degenerate quadrilateral.
pub fn crop_quad(img: &RgbImage, quad: &[Pt; 4]) -> Option<RgbImage> {
    let crop_w = dist(quad[0], quad[1]).max(dist(quad[2], quad[3])) as u32;
    let crop_h = dist(quad[0], quad[3]).max(dist(quad[1], quad[2])) as u32;
    if crop_w == 0 || crop_h == 0 || img.width() == 0 || img.height() == 0 {
        return None;
    }
    let (w, h) = (f64::from(crop_w), f64::from(crop_h));
    let target = [[0.0, 0.0], [w, 0.0], [w, h], [0.0, h]];
    // Output pixel → source position.
    let m = perspective_transform(&target, quad)?;
    let (src_w, src_h) = (img.width() as i64, img.height() as i64);
    let raw = img.as_raw();
    let fetch = |x: i64, y: i64, c: usize| -> f64 {
        let x = x.clamp(0, src_w - 1) as usize;
        let y = y.clamp(0, src_h - 1) as usize;
        f64::from(raw[(y * src_w as usize + x) * 3 + c])
    };
    let mut out = RgbImage::new(crop_w, crop_h);
    for oy in 0..crop_h {
        for ox in 0..crop_w {
            let (x, y) = (f64::from(ox), f64::from(oy));
            let z = m[6] * x + m[7] * y + m[8];
            let (sx, sy) = if z.abs() < 1e-12 {
                (0.0, 0.0)
            } else {
                (
                    (m[0] * x + m[1] * y + m[2]) / z,
                    (m[3] * x + m[4] * y + m[5]) / z,
                )
            };
            let (fx, fy) = (sx.floor(), sy.floor());
            let (wx, wy) = (cubic_weights(sx - fx), cubic_weights(sy - fy));
            let (ix, iy) = (fx as i64, fy as i64);
            let mut px = [0u8; 3];
            for (c, slot) in px.iter_mut().enumerate() {
                let mut acc = 0.0;
                for (j, wyj) in wy.iter().enumerate() {
                    let mut row = 0.0;
                    for (i, wxi) in wx.iter().enumerate() {
                        row += wxi * fetch(ix - 1 + i as i64, iy - 1 + j as i64, c);
                    }
                    acc += wyj * row;
                }
                *slot = acc.round().clamp(0.0, 255.0) as u8;
            }
            out.put_pixel(ox, oy, image::Rgb(px));
        }
    }
    if f64::from(crop_h) / f64::from(crop_w) >= 1.5 {
        out = image::imageops::rotate270(&out);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: Pt, b: Pt, tol: f64) -> bool {
        (a[0] - b[0]).abs() <= tol && (a[1] - b[1]).abs() <= tol
    }

    #[test]
    fn min_area_rect_of_rotated_rectangle() {
        // Corners of a 40×10 rectangle turned by 30° around (50, 50).
        let (c, s) = (30f64.to_radians().cos(), 30f64.to_radians().sin());
        let corners: Vec<Pt> = [[-20.0, -5.0], [20.0, -5.0], [20.0, 5.0], [-20.0, 5.0]]
            .iter()
            .map(|[x, y]| [50.0 + x * c - y * s, 50.0 + x * s + y * c])
            .collect();
        let mut pts = corners.clone();
        pts.push([50.0, 50.0]); // interior points must not matter
        let r = min_area_rect(&pts).unwrap();
        assert!((r.width.max(r.height) - 40.0).abs() < 1e-9);
        assert!((r.short_side() - 10.0).abs() < 1e-9);
        for p in corners {
            assert!(r.corners.iter().any(|q| close(p, *q, 1e-9)));
        }
        let [tl, tr, br, bl] = r.ordered_corners();
        assert!(tl[0] < tr[0] && bl[0] < br[0] && tl[1] < bl[1] && tr[1] < br[1]);
    }

    #[test]
    fn min_area_rect_degenerate() {
        assert!(min_area_rect(&[]).is_none());
        assert_eq!(min_area_rect(&[[3.0, 4.0]]).unwrap().short_side(), 0.0);
        let line = min_area_rect(&[[0.0, 0.0], [5.0, 0.0], [10.0, 0.0]]).unwrap();
        assert_eq!((line.width, line.short_side()), (10.0, 0.0));
    }

    #[test]
    fn unclip_matches_clipper_on_a_rectangle() {
        // pyclipper 1.4 offsets [[0.9,0.9],[10.7,0.9],[10.7,5.99],[0.9,5.99]] by 2 to
        // [[12,-1],[12,5],[11,7],[0,7],[-2,6],[-2,0],[-1,-2],[10,-2]] (collinear points dropped).
        let quad = [[0.9, 0.9], [10.7, 0.9], [10.7, 5.99], [0.9, 5.99]];
        // area 49.88 * r / perimeter 29.98 = 2 exactly needs r = 2 * 29.98 / 49.882
        let ratio = 2.0 * perimeter(&quad) / signed_area(&quad).abs();
        let out = unclip(&quad, ratio);
        let expected: [Pt; 8] = [
            [12.0, -1.0],
            [12.0, 5.0],
            [11.0, 7.0],
            [0.0, 7.0],
            [-2.0, 6.0],
            [-2.0, 0.0],
            [-1.0, -2.0],
            [10.0, -2.0],
        ];
        for e in expected {
            assert!(out.contains(&e), "{e:?} missing from {out:?}");
        }
        let hull = convex_hull(&out);
        for p in hull {
            assert!(
                expected.contains(&p) || p == [10.0, 7.0] || p == [0.0, -2.0],
                "{p:?}"
            );
        }
    }

    #[test]
    fn polygon_mean_counts_boundary_pixels() {
        let (w, h) = (10, 10);
        let mut map = vec![0.0f32; w * h];
        for y in 2..=5 {
            for x in 3..=7 {
                map[y * w + x] = 1.0;
            }
        }
        // The box exactly on the filled block's pixel centres.
        let score = mean_in_polygon(
            &map,
            w,
            h,
            &[[3.0, 2.0], [7.0, 2.0], [7.0, 5.0], [3.0, 5.0]],
        );
        assert!((score - 1.0).abs() < 1e-6, "{score}");
        let half = mean_in_polygon(
            &map,
            w,
            h,
            &[[3.0, 2.0], [7.0, 2.0], [7.0, 9.0], [3.0, 9.0]],
        );
        assert!((half - 0.5).abs() < 1e-6, "{half}");
    }

    #[test]
    fn perspective_crop_straightens_a_rotated_block() {
        // A dark 60×20 bar rotated by 20° on white; the crop of its corners must be dark
        // everywhere but the border and come out wider than tall.
        let (c, s) = (20f64.to_radians().cos(), 20f64.to_radians().sin());
        let to_img = |x: f64, y: f64| [100.0 + x * c - y * s, 60.0 + x * s + y * c];
        let img = RgbImage::from_fn(200, 120, |px, py| {
            let (dx, dy) = (f64::from(px) - 100.0, f64::from(py) - 60.0);
            let (u, v) = (dx * c + dy * s, -dx * s + dy * c);
            if u.abs() <= 30.0 && v.abs() <= 10.0 {
                image::Rgb([0, 0, 0])
            } else {
                image::Rgb([255, 255, 255])
            }
        });
        let quad = [
            to_img(-30.0, -10.0),
            to_img(30.0, -10.0),
            to_img(30.0, 10.0),
            to_img(-30.0, 10.0),
        ];
        let crop = crop_quad(&img, &quad).unwrap();
        // Sides are truncated like the reference's int(); float noise may cost a pixel.
        assert!(
            matches!(crop.dimensions(), (59..=60, 19..=20)),
            "{:?}",
            crop.dimensions()
        );
        let dark = crop.pixels().filter(|p| p.0[0] < 128).count();
        assert!(dark as f64 > 0.85 * 1200.0, "{dark}");

        // A tall crop is turned to lie horizontally.
        let tall = [[10.0, 10.0], [20.0, 10.0], [20.0, 50.0], [10.0, 50.0]];
        assert_eq!(crop_quad(&img, &tall).unwrap().dimensions(), (40, 10));
    }

    #[test]
    fn homography_maps_corners() {
        let from = [[0.0, 0.0], [10.0, 0.0], [10.0, 5.0], [0.0, 5.0]];
        let to = [[3.0, 4.0], [20.0, 6.0], [19.0, 15.0], [2.0, 12.0]];
        let m = perspective_transform(&from, &to).unwrap();
        for (f, t) in from.iter().zip(to) {
            let z = m[6] * f[0] + m[7] * f[1] + m[8];
            let p = [
                (m[0] * f[0] + m[1] * f[1] + m[2]) / z,
                (m[3] * f[0] + m[4] * f[1] + m[5]) / z,
            ];
            assert!(close(p, t, 1e-9));
        }
        assert!(
            perspective_transform(&[[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [3.0, 3.0]], &to).is_none()
        );
    }
}
