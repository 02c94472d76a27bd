//! Scenes and their rendering: the suite's grammar (see the crate README for the spec).

use crate::rng::SplitMix64;
use serde::{Deserialize, Serialize};

/// Frame side in pixels (square frames).
pub const FRAME: usize = 64;
/// Frames per video.
pub const FRAMES: usize = 32;
/// Frames per second of the encoded video (so every video lasts 4 s).
pub const FPS: usize = 8;
/// Patch side of the suite's vision tower; the detail object sits on this grid.
pub const CELL: usize = 8;
/// Side of a moving object's bounding box.
pub const MOVER: usize = 16;
/// Total displacement of a mover over the video, pixels.
pub const TRAVEL: usize = 24;
/// Side of the small (detail) object.
pub const SMALL: usize = 8;
/// The flash: a square of this side centred in the frame, on this many consecutive frames.
pub const FLASH: usize = 32;
pub const FLASH_FRAMES: usize = 2;

pub const COLOURS: [(&str, [u8; 3]); 8] = [
    ("red", [230, 40, 40]),
    ("green", [40, 200, 60]),
    ("blue", [60, 100, 250]),
    ("yellow", [240, 220, 40]),
    ("magenta", [220, 60, 220]),
    ("cyan", [40, 220, 220]),
    ("white", [240, 240, 240]),
    ("orange", [250, 140, 20]),
];
pub const BACKGROUNDS: [(&str, [u8; 3]); 4] = [
    ("black", [0, 0, 0]),
    ("gray", [110, 110, 110]),
    ("navy", [20, 20, 90]),
    ("olive", [90, 90, 20]),
];
pub const SHAPES: [&str; 4] = ["circle", "square", "triangle", "cross"];
pub const DIRECTIONS: [&str; 4] = ["up", "down", "left", "right"];
/// The small object's colour (only its shape is asked).
pub const SMALL_COLOUR: [u8; 3] = [255, 255, 255];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Shape {
    Circle,
    Square,
    Triangle,
    Cross,
}

impl Shape {
    pub const ALL: [Shape; 4] = [Shape::Circle, Shape::Square, Shape::Triangle, Shape::Cross];
    pub fn name(self) -> &'static str {
        SHAPES[self as usize]
    }
    /// Whether pixel (px, py) of a `size`-sided box is inside the shape (pixel centres).
    pub fn covers(self, px: usize, py: usize, size: usize) -> bool {
        let z = size as f64;
        let (x, y) = (px as f64 + 0.5, py as f64 + 0.5);
        let (cx, cy) = (z / 2.0, z / 2.0);
        match self {
            Shape::Square => true,
            Shape::Circle => (x - cx).powi(2) + (y - cy).powi(2) <= (z / 2.0).powi(2),
            // Apex at the top middle, base along the bottom edge.
            Shape::Triangle => y / z >= 2.0 * (x - cx).abs() / z,
            // A plus sign with arms a third of the side thick.
            Shape::Cross => (x - cx).abs() <= z / 6.0 || (y - cy).abs() <= z / 6.0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Up,
    Down,
    Left,
    Right,
}

impl Direction {
    pub const ALL: [Direction; 4] = [
        Direction::Up,
        Direction::Down,
        Direction::Left,
        Direction::Right,
    ];
    pub fn name(self) -> &'static str {
        DIRECTIONS[self as usize]
    }
    fn unit(self) -> (i64, i64) {
        match self {
            Direction::Up => (0, -1),
            Direction::Down => (0, 1),
            Direction::Left => (-1, 0),
            Direction::Right => (1, 0),
        }
    }
}

/// An object that moves in a straight line over the whole video.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Mover {
    /// Index into [`COLOURS`].
    pub colour: usize,
    pub shape: Shape,
    pub direction: Direction,
    /// Top-left corner on the first frame.
    pub start: (usize, usize),
}

impl Mover {
    /// Top-left corner on frame `f`: `start + round(TRAVEL * f / (FRAMES - 1)) * direction`.
    pub fn position(&self, f: usize) -> (usize, usize) {
        let step = ((TRAVEL * f) as f64 / (FRAMES - 1) as f64).round() as i64;
        let (dx, dy) = self.direction.unit();
        (
            (self.start.0 as i64 + dx * step) as usize,
            (self.start.1 as i64 + dy * step) as usize,
        )
    }
}

/// One video's content.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scene {
    pub id: String,
    pub seed: u64,
    /// Index into [`BACKGROUNDS`].
    pub background: usize,
    pub movers: Vec<Mover>,
    /// Index into [`COLOURS`]; shown on frames `flash_frame .. flash_frame + FLASH_FRAMES`.
    pub flash_colour: usize,
    pub flash_frame: usize,
    pub small_shape: Shape,
    /// Grid cell (column, row) of the small object, in units of [`CELL`].
    pub small_cell: (usize, usize),
}

impl Scene {
    /// Samples a scene from its seed (the draws are in the order of the spec).
    pub fn sample(id: String, seed: u64) -> Self {
        let mut r = SplitMix64::new(seed);
        let background = r.below(BACKGROUNDS.len());
        let n_movers = 2 + r.below(2);
        let colours = r.distinct(COLOURS.len(), n_movers);
        let shapes = r.distinct(SHAPES.len(), n_movers);
        let movers = (0..n_movers)
            .map(|i| {
                let direction = Direction::ALL[r.below(4)];
                // The start is drawn so that the whole path stays inside the frame.
                let span = FRAME - MOVER; // last valid top-left coordinate
                let (lo_x, hi_x, lo_y, hi_y) = match direction {
                    Direction::Left => (TRAVEL, span, 0, span),
                    Direction::Right => (0, span - TRAVEL, 0, span),
                    Direction::Up => (0, span, TRAVEL, span),
                    Direction::Down => (0, span, 0, span - TRAVEL),
                };
                let x = lo_x + r.below(hi_x - lo_x + 1);
                let y = lo_y + r.below(hi_y - lo_y + 1);
                Mover {
                    colour: colours[i],
                    shape: Shape::ALL[shapes[i]],
                    direction,
                    start: (x, y),
                }
            })
            .collect();
        let flash_colour = r.below(COLOURS.len());
        let flash_frame = r.below(FRAMES - FLASH_FRAMES + 1);
        let small_shape = Shape::ALL[r.below(4)];
        // Any cell outside the central 4x4 cells (the ring of width 2 around it).
        let ring: Vec<(usize, usize)> = (0..FRAME / CELL)
            .flat_map(|row| (0..FRAME / CELL).map(move |col| (col, row)))
            .filter(|&(c, rr)| !((2..6).contains(&c) && (2..6).contains(&rr)))
            .collect();
        let small_cell = ring[r.below(ring.len())];
        Scene {
            id,
            seed,
            background,
            movers,
            flash_colour,
            flash_frame,
            small_shape,
            small_cell,
        }
    }

    pub fn flash_on(&self, f: usize) -> bool {
        (self.flash_frame..self.flash_frame + FLASH_FRAMES).contains(&f)
    }

    /// Frame `f` as RGB bytes, row-major, `FRAME * FRAME * 3`. Drawing order: background,
    /// movers in list order, the small object, the flash.
    pub fn render(&self, f: usize) -> Vec<u8> {
        let mut img = vec![0u8; FRAME * FRAME * 3];
        let bg = BACKGROUNDS[self.background].1;
        for px in img.chunks_exact_mut(3) {
            px.copy_from_slice(&bg);
        }
        let mut stamp = |x0: usize, y0: usize, size: usize, shape: Shape, rgb: [u8; 3]| {
            for dy in 0..size {
                for dx in 0..size {
                    let (x, y) = (x0 + dx, y0 + dy);
                    if x < FRAME && y < FRAME && shape.covers(dx, dy, size) {
                        img[(y * FRAME + x) * 3..][..3].copy_from_slice(&rgb);
                    }
                }
            }
        };
        for m in &self.movers {
            let (x, y) = m.position(f);
            stamp(x, y, MOVER, m.shape, COLOURS[m.colour].1);
        }
        let (c, r) = self.small_cell;
        stamp(c * CELL, r * CELL, SMALL, self.small_shape, SMALL_COLOUR);
        if self.flash_on(f) {
            let o = (FRAME - FLASH) / 2;
            stamp(o, o, FLASH, Shape::Square, COLOURS[self.flash_colour].1);
        }
        img
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_are_distinct_masks() {
        let mask = |s: Shape| -> Vec<bool> {
            (0..64)
                .map(|i| s.covers(i % 8, i / 8, 8))
                .collect::<Vec<_>>()
        };
        let all: Vec<_> = Shape::ALL.iter().map(|&s| mask(s)).collect();
        for (i, a) in all.iter().enumerate() {
            for (j, b) in all.iter().enumerate().skip(i + 1) {
                assert_ne!(a, b, "{:?} vs {:?}", Shape::ALL[i], Shape::ALL[j]);
            }
        }
        // Square fills the box; the triangle's apex row is narrower than its base.
        assert!(all[1].iter().all(|&b| b));
        let row = |m: &Vec<bool>, r: usize| m[r * 8..r * 8 + 8].iter().filter(|&&b| b).count();
        assert!(row(&all[2], 0) < row(&all[2], 7));
    }

    #[test]
    fn movers_stay_in_frame_and_travel() {
        for seed in 0..500 {
            let s = Scene::sample(format!("t{seed}"), seed);
            assert!((2..=3).contains(&s.movers.len()));
            for m in &s.movers {
                let (a, b) = (m.position(0), m.position(FRAMES - 1));
                let moved = a.0.abs_diff(b.0) + a.1.abs_diff(b.1);
                assert_eq!(moved, TRAVEL);
                assert!(b.0 + MOVER <= FRAME && b.1 + MOVER <= FRAME);
            }
            let (c, r) = s.small_cell;
            assert!(!((2..6).contains(&c) && (2..6).contains(&r)));
            assert!(s.flash_frame + FLASH_FRAMES <= FRAMES);
        }
    }

    #[test]
    fn render_draws_the_flash_only_on_its_frames() {
        let s = Scene::sample("x".into(), 7);
        let centre = |f: usize| {
            let img = s.render(f);
            let i = (32 * FRAME + 32) * 3;
            [img[i], img[i + 1], img[i + 2]]
        };
        assert_eq!(centre(s.flash_frame), COLOURS[s.flash_colour].1);
        let off = if s.flash_frame >= 3 { 0 } else { FRAMES - 1 };
        assert_ne!(centre(off), COLOURS[s.flash_colour].1);
        // The small object is white and sits at its cell.
        let img = s.render(0);
        let (c, r) = s.small_cell;
        let i = ((r * CELL + 4) * FRAME + c * CELL + 4) * 3;
        assert_eq!(&img[i..i + 3], &SMALL_COLOUR);
    }
}
