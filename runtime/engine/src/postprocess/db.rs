//! DBNet post-processing: probability map → text quadrilaterals in reading order.
//!
//! The steps and constants are those of rapidocr 3.10 (`DBPostProcess` with `score_mode=fast`,
//! `use_dilation=true`, then `filter_det_res` and `sorted_boxes`), so the same map yields the
//! same boxes to within a pixel.

use image::GrayImage;
use imageproc::contours::find_contours;

use super::geometry::{self, min_area_rect, Pt};

/// Tuning of the DB post-processing; the defaults are rapidocr's.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct DbParams {
    /// Probability above which a pixel counts as text.
    pub thresh: f32,
    /// Minimum mean probability inside a box for it to be kept.
    pub box_thresh: f32,
    /// At most this many contours are considered, in the order they are found.
    pub max_candidates: usize,
    /// How far boxes are grown back out (DB shrinks text regions during training).
    pub unclip_ratio: f32,
    /// Dilate the binary map with a 2×2 kernel first (joins characters split by one pixel).
    pub use_dilation: bool,
}

impl Default for DbParams {
    fn default() -> Self {
        Self {
            thresh: 0.3,
            box_thresh: 0.5,
            max_candidates: 1000,
            unclip_ratio: 1.6,
            use_dilation: true,
        }
    }
}

/// A detected text region: corners top-left, top-right, bottom-right, bottom-left, in the
/// pixel coordinates of the image the map was computed for (integers, as in the reference).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DetBox {
    pub points: [[f32; 2]; 4],
    pub score: f32,
}

impl DetBox {
    pub fn points_f64(&self) -> [Pt; 4] {
        self.points.map(|[x, y]| [f64::from(x), f64::from(y)])
    }
}

// Contours whose rectangle is thinner than this (in map pixels) are noise.
const MIN_SIZE: f64 = 3.0;
// Boxes on the same line when their top-left corners differ by less than this (pixels).
const SAME_LINE_DY: f32 = 10.0;

/// Turns a `map_w`×`map_h` probability map into boxes in a `dest_w`×`dest_h` image, sorted in
/// reading order.
pub fn boxes_from_map(
    map: &[f32],
    map_w: usize,
    map_h: usize,
    dest_w: u32,
    dest_h: u32,
    params: &DbParams,
) -> Vec<DetBox> {
    if map_w == 0 || map_h == 0 || map.len() < map_w * map_h {
        return Vec::new();
    }
    let bitmap = binarize(map, map_w, map_h, params.thresh, params.use_dilation);
    let contours = find_contours::<i32>(&bitmap);

    let mut boxes = Vec::new();
    for contour in contours.iter().take(params.max_candidates) {
        let pts: Vec<Pt> = contour
            .points
            .iter()
            .map(|p| [f64::from(p.x), f64::from(p.y)])
            .collect();
        let Some(rect) = min_area_rect(&pts) else {
            continue;
        };
        if rect.short_side() < MIN_SIZE {
            continue;
        }
        let mini = rect.ordered_corners();
        let score = geometry::mean_in_polygon(map, map_w, map_h, &mini);
        if score < params.box_thresh {
            continue;
        }
        let grown = geometry::unclip(&mini, f64::from(params.unclip_ratio));
        let Some(rect) = min_area_rect(&grown) else {
            continue;
        };
        if rect.short_side() < MIN_SIZE + 2.0 {
            continue;
        }
        let scale = |v: f64, from: usize, to: u32| {
            (v / from as f64 * f64::from(to))
                .round_ties_even()
                .clamp(0.0, f64::from(to))
        };
        let scaled = rect
            .ordered_corners()
            .map(|[x, y]| [scale(x, map_w, dest_w), scale(y, map_h, dest_h)]);
        if let Some(points) = order_and_clip(scaled, dest_w, dest_h) {
            boxes.push(DetBox { points, score });
        }
    }
    sort_reading_order(&mut boxes);
    boxes
}

fn binarize(map: &[f32], w: usize, h: usize, thresh: f32, dilate: bool) -> GrayImage {
    let on = |x: usize, y: usize| map[y * w + x] > thresh;
    GrayImage::from_fn(w as u32, h as u32, |x, y| {
        let (x, y) = (x as usize, y as usize);
        // The 2×2 kernel is anchored at its bottom-right cell, so it looks up and to the left.
        let hit = on(x, y)
            || (dilate
                && ((x > 0 && on(x - 1, y))
                    || (y > 0 && on(x, y - 1))
                    || (x > 0 && y > 0 && on(x - 1, y - 1))));
        image::Luma([if hit { 255 } else { 0 }])
    })
}

/// The reference's `order_points_clockwise` + `clip_det_res` + size filter: corners ordered
/// by x then y, clipped into the image, and dropped when a side is 3 pixels or less.
fn order_and_clip(pts: [Pt; 4], w: u32, h: u32) -> Option<[[f32; 2]; 4]> {
    let mut by_x = pts;
    by_x.sort_by(|a, b| a[0].total_cmp(&b[0]));
    let mut left = [by_x[0], by_x[1]];
    let mut right = [by_x[2], by_x[3]];
    left.sort_by(|a, b| a[1].total_cmp(&b[1]));
    right.sort_by(|a, b| a[1].total_cmp(&b[1]));
    let clip = |[x, y]: Pt| {
        [
            x.clamp(0.0, f64::from(w) - 1.0).trunc(),
            y.clamp(0.0, f64::from(h) - 1.0).trunc(),
        ]
    };
    let ordered = [left[0], right[0], right[1], left[1]].map(clip);
    let width = geometry::dist(ordered[0], ordered[1]).trunc();
    let height = geometry::dist(ordered[0], ordered[3]).trunc();
    if width <= 3.0 || height <= 3.0 {
        return None;
    }
    Some(ordered.map(|[x, y]| [x as f32, y as f32]))
}

/// Reading order as rapidocr's `sorted_boxes`: a stable sort on the top-left y, a new line
/// wherever consecutive tops differ by 10 pixels or more, then left to right within a line.
pub fn sort_reading_order(boxes: &mut [DetBox]) {
    boxes.sort_by(|a, b| a.points[0][1].total_cmp(&b.points[0][1]));
    let mut line = 0usize;
    let mut keyed: Vec<(usize, f32, DetBox)> = Vec::with_capacity(boxes.len());
    for (i, b) in boxes.iter().enumerate() {
        if i > 0 && b.points[0][1] - boxes[i - 1].points[0][1] >= SAME_LINE_DY {
            line += 1;
        }
        keyed.push((line, b.points[0][0], *b));
    }
    keyed.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)));
    for (slot, (_, _, b)) in boxes.iter_mut().zip(keyed) {
        *slot = b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A probability map with rotated rectangles (centre, size, angle in degrees) at 0.9 on 0.05.
    fn map_with(w: usize, h: usize, rects: &[([f64; 2], [f64; 2], f64)]) -> Vec<f32> {
        let mut map = vec![0.05f32; w * h];
        for &(c, size, deg) in rects {
            let (s, co) = deg.to_radians().sin_cos();
            for y in 0..h {
                for x in 0..w {
                    let (dx, dy) = (x as f64 - c[0], y as f64 - c[1]);
                    let (u, v) = (dx * co + dy * s, -dx * s + dy * co);
                    if u.abs() <= size[0] / 2.0 && v.abs() <= size[1] / 2.0 {
                        map[y * w + x] = 0.9;
                    }
                }
            }
        }
        map
    }

    fn centre(b: &DetBox) -> [f32; 2] {
        let sx: f32 = b.points.iter().map(|p| p[0]).sum();
        let sy: f32 = b.points.iter().map(|p| p[1]).sum();
        [sx / 4.0, sy / 4.0]
    }

    #[test]
    fn two_rotated_rectangles_give_two_boxes_in_reading_order() {
        let (w, h) = (320, 160);
        // The lower one listed first, so the order must come from the sort.
        let map = map_with(
            w,
            h,
            &[
                ([100.0, 110.0], [120.0, 16.0], 8.0),
                ([200.0, 40.0], [160.0, 20.0], -5.0),
            ],
        );
        let boxes = boxes_from_map(&map, w, h, w as u32, h as u32, &DbParams::default());
        assert_eq!(boxes.len(), 2, "{boxes:?}");
        let (c0, c1) = (centre(&boxes[0]), centre(&boxes[1]));
        assert!(
            (c0[0] - 200.0).abs() < 3.0 && (c0[1] - 40.0).abs() < 3.0,
            "{c0:?}"
        );
        assert!(
            (c1[0] - 100.0).abs() < 3.0 && (c1[1] - 110.0).abs() < 3.0,
            "{c1:?}"
        );
        for b in &boxes {
            // Staircase edges of a rotated region pull the mean a little below 0.9.
            assert!(b.score > 0.75, "{b:?}");
            let [tl, tr, br, bl] = b.points_f64();
            assert!(tl[0] < tr[0] && bl[0] < br[0] && tl[1] < bl[1] && tr[1] < br[1]);
        }
        // Unclipping grows the 20-pixel-high region: area/perimeter * 1.6 ≈ 14 px per side.
        let [tl, _, _, bl] = boxes[0].points_f64();
        let height = geometry::dist(tl, bl);
        assert!(height > 40.0 && height < 56.0, "{height}");
    }

    #[test]
    fn boxes_scale_to_the_destination_image() {
        let map = map_with(160, 96, &[([80.0, 48.0], [100.0, 12.0], 0.0)]);
        let boxes = boxes_from_map(&map, 160, 96, 800, 480, &DbParams::default());
        assert_eq!(boxes.len(), 1);
        let c = centre(&boxes[0]);
        assert!(
            (c[0] - 400.0).abs() < 8.0 && (c[1] - 240.0).abs() < 8.0,
            "{c:?}"
        );
        assert!(boxes[0]
            .points
            .iter()
            .all(|p| p[0] <= 799.0 && p[1] <= 479.0));
    }

    #[test]
    fn weak_and_tiny_regions_are_dropped() {
        let (w, h) = (200, 100);
        // One pixel: 2×2 after dilation, its rectangle (between pixel centres) is 1 wide.
        let mut map = map_with(w, h, &[([50.0, 50.0], [1.0, 1.0], 0.0)]);
        // A large region just above `thresh` but below `box_thresh`.
        for y in 10..30 {
            for x in 100..180 {
                map[y * w + x] = 0.4;
            }
        }
        assert!(boxes_from_map(&map, w, h, w as u32, h as u32, &DbParams::default()).is_empty());
        assert!(boxes_from_map(&[], 0, 0, 10, 10, &DbParams::default()).is_empty());
    }

    #[test]
    fn reading_order_groups_lines_within_ten_pixels() {
        let mk = |x: f32, y: f32| DetBox {
            points: [[x, y], [x + 50.0, y], [x + 50.0, y + 20.0], [x, y + 20.0]],
            score: 1.0,
        };
        // Two lines; the right word of the first line sits 6 px higher than the left one.
        let mut boxes = vec![
            mk(300.0, 104.0),
            mk(200.0, 12.0),
            mk(10.0, 100.0),
            mk(10.0, 18.0),
        ];
        sort_reading_order(&mut boxes);
        let order: Vec<[f32; 2]> = boxes.iter().map(|b| b.points[0]).collect();
        assert_eq!(
            order,
            vec![[10.0, 18.0], [200.0, 12.0], [10.0, 100.0], [300.0, 104.0]]
        );
    }
}
