//! SigLIP preprocessing as transformers' image processor does it: bicubic resize of the whole
//! frame to `size x size` (no crop), rescale by 1/255, normalise with mean = std = 0.5,
//! channel-first `f32`.
//!
//! The resize is Pillow's `ImagingResample` bicubic (Keys cubic, a = -0.5, support widened by the
//! downscale factor, i.e. antialiased), which torchvision's antialiased uint8 kernel reproduces:
//! a horizontal pass then a vertical pass, each with 22-bit fixed-point coefficients and the
//! intermediate image rounded and clamped to uint8.

use crate::decode::{Probe, SampledFrame, SampledVideo};
use crate::{MediaPolicy, VideoError};
use image::RgbImage;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Preprocess {
    pub size: u32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Default for Preprocess {
    fn default() -> Self {
        Self {
            size: 384,
            mean: [0.5; 3],
            std: [0.5; 3],
        }
    }
}

fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow's `precompute_coeffs`: for each output index, the first input index and the
/// fixed-point weights.
fn coefficients(input: u32, output: u32) -> Vec<(usize, Vec<i32>)> {
    let scale = input as f64 / output as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    (0..output)
        .map(|o| {
            let center = (o as f64 + 0.5) * scale;
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(input as i64) as usize;
            let w: Vec<f64> = (xmin..xmax)
                .map(|x| bicubic((x as f64 - center + 0.5) / filterscale))
                .collect();
            let total: f64 = w.iter().sum();
            let k = w
                .iter()
                .map(|v| {
                    let v = if total != 0.0 { v / total } else { 0.0 };
                    let f = v * (1u32 << PRECISION_BITS) as f64;
                    (if f < 0.0 { f - 0.5 } else { f + 0.5 }) as i32
                })
                .collect();
            (xmin, k)
        })
        .collect()
}

fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// The resized uint8 frame (what the processor normalises).
pub fn resize_rgb(img: &RgbImage, size: u32) -> RgbImage {
    let (w, h) = (img.width(), img.height());
    if w == size && h == size {
        return img.clone();
    }
    let src = img.as_raw();
    // Horizontal pass: w x h -> size x h.
    let cx = coefficients(w, size);
    let mut mid = vec![0u8; (size * h * 3) as usize];
    for y in 0..h as usize {
        let row = &src[y * w as usize * 3..(y + 1) * w as usize * 3];
        for (ox, (x0, k)) in cx.iter().enumerate() {
            for c in 0..3 {
                let mut acc: i64 = 1 << (PRECISION_BITS - 1);
                for (j, kk) in k.iter().enumerate() {
                    acc += row[(x0 + j) * 3 + c] as i64 * *kk as i64;
                }
                mid[(y * size as usize + ox) * 3 + c] = clip8(acc);
            }
        }
    }
    // Vertical pass: size x h -> size x size.
    let cy = coefficients(h, size);
    let stride = size as usize * 3;
    let mut out = vec![0u8; (size * size * 3) as usize];
    for (oy, (y0, k)) in cy.iter().enumerate() {
        for i in 0..stride {
            let mut acc: i64 = 1 << (PRECISION_BITS - 1);
            for (j, kk) in k.iter().enumerate() {
                acc += mid[(y0 + j) * stride + i] as i64 * *kk as i64;
            }
            out[oy * stride + i] = clip8(acc);
        }
    }
    RgbImage::from_raw(size, size, out).expect("buffer sized above")
}

/// One frame -> `3 * size * size` normalised values, channel-first.
pub fn preprocess_rgb(img: &RgbImage, p: &Preprocess) -> Vec<f32> {
    let r = resize_rgb(img, p.size);
    let n = (p.size * p.size) as usize;
    let mut out = vec![0f32; 3 * n];
    for (i, px) in r.pixels().enumerate() {
        for c in 0..3 {
            out[c * n + i] = (px[c] as f32 / 255.0 - p.mean[c]) / p.std[c];
        }
    }
    out
}

/// Still images (JPEG/PNG bytes) as the frames of a video, one frame each, in order.
pub fn frames_from_images(
    images: &[Vec<u8>],
    policy: &MediaPolicy,
    p: &Preprocess,
) -> Result<SampledVideo, VideoError> {
    if images.is_empty() {
        return Err(VideoError::Invalid("no images".into()));
    }
    if images.len() > policy.max_images {
        return Err(VideoError::TooLarge {
            what: "image count",
            value: images.len().to_string(),
            limit: policy.max_images.to_string(),
        });
    }
    let mut pixels = Vec::with_capacity(images.len() * 3 * (p.size * p.size) as usize);
    let mut frames = vec![];
    let (mut w0, mut h0) = (0, 0);
    for (i, bytes) in images.iter().enumerate() {
        if bytes.is_empty() {
            return Err(VideoError::Empty);
        }
        let reader = image::ImageReader::new(std::io::Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| VideoError::NotAnImage(e.to_string()))?;
        let (w, h) = reader
            .into_dimensions()
            .map_err(|e| VideoError::NotAnImage(format!("image {i}: {e}")))?;
        check_dims(w, h, policy)?;
        let img = image::load_from_memory(bytes)
            .map_err(|e| VideoError::NotAnImage(format!("image {i}: {e}")))?
            .to_rgb8();
        if i == 0 {
            (w0, h0) = (w, h);
        }
        pixels.extend(preprocess_rgb(&img, p));
        frames.push(SampledFrame {
            index: i as u64,
            timestamp_s: i as f64,
            requested_s: i as f64,
        });
    }
    Ok(SampledVideo {
        probe: Probe {
            container: "images".into(),
            codec: "image".into(),
            width: w0,
            height: h0,
            duration_s: images.len() as f64,
            frame_rate: 1.0,
            frame_count: images.len() as u64,
            rotation_deg: 0,
            duration_from_container: false,
        },
        frames,
        pixels,
        size: p.size,
        decoded_frames: images.len() as u64,
        seeked: false,
    })
}

pub(crate) fn check_dims(w: u32, h: u32, policy: &MediaPolicy) -> Result<(), VideoError> {
    if w == 0 || h == 0 {
        return Err(VideoError::Corrupt(format!("frame size {w}x{h}")));
    }
    if w > policy.max_side || h > policy.max_side {
        return Err(VideoError::TooLarge {
            what: "frame side",
            value: format!("{w}x{h}"),
            limit: policy.max_side.to_string(),
        });
    }
    if w as u64 * h as u64 > policy.max_pixels_per_frame {
        return Err(VideoError::TooLarge {
            what: "pixels per frame",
            value: (w as u64 * h as u64).to_string(),
            limit: policy.max_pixels_per_frame.to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_to_minus_one_one_channel_first() {
        let mut img = RgbImage::new(2, 2);
        img.put_pixel(0, 0, image::Rgb([255, 0, 127]));
        let p = Preprocess {
            size: 2,
            ..Default::default()
        };
        let v = preprocess_rgb(&img, &p);
        assert_eq!(v.len(), 12);
        assert_eq!(v[0], 1.0); // R of pixel 0
        assert_eq!(v[4], -1.0); // G of pixel 0
        assert!((v[8] - (127.0 / 255.0 - 0.5) / 0.5).abs() < 1e-7); // B of pixel 0
        assert_eq!(v[1], -1.0); // R of pixel 1 (black)
    }

    #[test]
    fn bad_images_are_errors() {
        let policy = MediaPolicy::default();
        let p = Preprocess::default();
        assert!(matches!(
            frames_from_images(&[], &policy, &p),
            Err(VideoError::Invalid(_))
        ));
        assert!(matches!(
            frames_from_images(&[vec![]], &policy, &p),
            Err(VideoError::Empty)
        ));
        assert!(matches!(
            frames_from_images(&[b"not an image".to_vec()], &policy, &p),
            Err(VideoError::NotAnImage(_))
        ));
    }

    #[test]
    fn decodes_png_frames() {
        let mut buf = vec![];
        let img = RgbImage::from_pixel(20, 10, image::Rgb([10, 200, 30]));
        img.write_to(&mut std::io::Cursor::new(&mut buf), image::ImageFormat::Png)
            .unwrap();
        let v = frames_from_images(
            &[buf.clone(), buf],
            &MediaPolicy::default(),
            &Preprocess {
                size: 8,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(v.frames.len(), 2);
        assert_eq!(v.pixels.len(), 2 * 3 * 64);
        assert!((v.pixels[0] - (10.0 / 255.0 - 0.5) / 0.5).abs() < 2.0 / 255.0);
    }
}
