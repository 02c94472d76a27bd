//! SigLIP preprocessing as transformers' image processor does it: bicubic resize of the whole
//! frame to `size x size` (no crop; Keys cubic a = -0.5 with the kernel widened when
//! downscaling, i.e. antialiased, as PIL and torchvision's antialias=True), rescale by 1/255,
//! normalise with mean = std = 0.5, channel-first `f32`.

use crate::decode::{Probe, SampledFrame, SampledVideo};
use crate::{MediaPolicy, VideoError};
use image::imageops::FilterType;
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

/// The resized uint8 frame (what the processor normalises).
pub fn resize_rgb(img: &RgbImage, size: u32) -> RgbImage {
    if img.width() == size && img.height() == size {
        return img.clone();
    }
    image::imageops::resize(img, size, size, FilterType::CatmullRom)
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
