//! Probing and decoding with ffmpeg (ffmpeg-next as re-exported by video-rs).

use crate::preprocess::{check_dims, preprocess_rgb, Preprocess};
use crate::sampling::{sample_timestamps, FrameSampling};
use crate::{MediaPolicy, VideoError};
use image::RgbImage;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Instant;
use video_rs::ffmpeg as ff;

/// What a container says about its best video stream (checked, not trusted blindly).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Probe {
    pub container: String,
    pub codec: String,
    pub width: u32,
    pub height: u32,
    pub duration_s: f64,
    pub frame_rate: f64,
    /// Reported or estimated (duration x rate).
    pub frame_count: u64,
    /// Display rotation (clockwise degrees: 0, 90, 180, 270), applied to decoded frames.
    pub rotation_deg: i32,
    /// The stream had no duration and the container's was used (WebM).
    pub duration_from_container: bool,
}

/// One sampled frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampledFrame {
    /// Index of the decoded frame in display order (estimated from its timestamp after a seek).
    pub index: u64,
    /// The frame's own timestamp, seconds from the stream start.
    pub timestamp_s: f64,
    /// The instant that was asked for.
    pub requested_s: f64,
}

/// Sampled, preprocessed frames.
#[derive(Debug, Clone)]
pub struct SampledVideo {
    pub probe: Probe,
    pub frames: Vec<SampledFrame>,
    /// `[T, 3, size, size]`, row-major.
    pub pixels: Vec<f32>,
    pub size: u32,
    /// Frames the decoder produced (the decode work done).
    pub decoded_frames: u64,
    /// Whether seeking was used.
    pub seeked: bool,
}

impl SampledVideo {
    /// One sampled frame's preprocessed values (`3 * size * size`).
    pub fn frame_pixels(&self, i: usize) -> &[f32] {
        let n = 3 * (self.size * self.size) as usize;
        &self.pixels[i * n..(i + 1) * n]
    }
}

struct Opened {
    input: ff::format::context::Input,
    stream: usize,
    time_base: f64,
    start: i64,
    probe: Probe,
}

/// The container formats (demuxer names) vvlm opens. Deliberately absent: playlists and
/// manifests (hls, dash), concatenation (concat), image sequences (image2) and anything else
/// that makes the demuxer open further files or URLs named inside the input.
pub const ALLOWED_DEMUXERS: &str = "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,avi,mpegts,flv,ogg,\
                                    asf,mpeg,m4v,h264,hevc,mjpeg,ivf,obu,nut,gif,wav";

/// The most streams (video, audio, subtitles, data) a container may hold.
pub const MAX_STREAMS: usize = 32;

/// Opens a local file for demuxing with the input restricted: only [`ALLOWED_DEMUXERS`], only
/// the `file` protocol, and every blocking read interrupted once `deadline` has passed.
fn open_input(path: &Path, deadline: Instant) -> Result<ff::format::context::Input, VideoError> {
    let mut opts = ff::Dictionary::new();
    opts.set("format_whitelist", ALLOWED_DEMUXERS);
    opts.set("protocol_whitelist", "file");
    // Each stream costs the demuxer (and stream-info probing) memory: a container with a
    // thousand streams cost ~1 GB per request. Videos have one or a few.
    opts.set("max_streams", &MAX_STREAMS.to_string());
    ff::format::input_with_interrupt_and_dictionary(&path, move || Instant::now() > deadline, opts)
        .map_err(|e| VideoError::NotAVideo(e.to_string()))
}

fn deadline(started: Instant, policy: &MediaPolicy) -> Instant {
    started + std::time::Duration::from_secs_f64(policy.decode_timeout_s.clamp(0.0, 1e6))
}

fn open(path: &Path, policy: &MediaPolicy, started: Instant) -> Result<Opened, VideoError> {
    crate::init();
    let meta =
        std::fs::metadata(path).map_err(|e| VideoError::Io(format!("{}: {e}", path.display())))?;
    if meta.len() == 0 {
        return Err(VideoError::Empty);
    }
    if meta.len() > policy.max_bytes {
        return Err(VideoError::TooLarge {
            what: "file size",
            value: meta.len().to_string(),
            limit: policy.max_bytes.to_string(),
        });
    }
    let input = open_input(path, deadline(started, policy))?;
    let stream = input
        .streams()
        .best(ff::media::Type::Video)
        .ok_or(VideoError::NoVideoStream)?;
    let params = stream.parameters();
    let codec_id = params.id();
    if codec_id == ff::codec::Id::None {
        return Err(VideoError::UnsupportedCodec("unknown".into()));
    }
    let codec = codec_id.name().to_string();
    let ctx = ff::codec::context::Context::from_parameters(params)
        .map_err(|e| VideoError::UnsupportedCodec(format!("{codec}: {e}")))?;
    let dec = ctx
        .decoder()
        .video()
        .map_err(|e| VideoError::UnsupportedCodec(format!("{codec}: {e}")))?;
    let (width, height) = (dec.width(), dec.height());
    check_dims(width, height, policy)?;
    let tb = stream.time_base();
    let time_base = if tb.denominator() != 0 {
        tb.numerator() as f64 / tb.denominator() as f64
    } else {
        0.0
    };
    let rate = |r: ff::Rational| {
        if r.denominator() > 0 && r.numerator() > 0 {
            r.numerator() as f64 / r.denominator() as f64
        } else {
            0.0
        }
    };
    let mut frame_rate = rate(stream.avg_frame_rate());
    if !(frame_rate > 0.0 && frame_rate < 1000.0) {
        frame_rate = rate(stream.rate());
    }
    let stream_dur = stream.duration() as f64 * time_base;
    let container_dur = input.duration() as f64 / f64::from(ff::ffi::AV_TIME_BASE);
    let (duration_s, from_container) =
        if stream.duration() > 0 && stream_dur.is_finite() && stream_dur > 0.0 {
            (stream_dur, false)
        } else if input.duration() > 0 {
            (container_dur, true)
        } else if stream.frames() > 0 && frame_rate > 0.0 {
            (stream.frames() as f64 / frame_rate, false)
        } else {
            return Err(VideoError::BadDuration(
                "the container reports no duration".into(),
            ));
        };
    if !(duration_s.is_finite() && duration_s > 0.0) {
        return Err(VideoError::BadDuration(format!("{duration_s} s")));
    }
    if duration_s > policy.max_duration_s {
        return Err(VideoError::TooLarge {
            what: "duration (s)",
            value: format!("{duration_s:.1}"),
            limit: format!("{}", policy.max_duration_s),
        });
    }
    let frame_count = if stream.frames() > 0 {
        stream.frames() as u64
    } else {
        (duration_s * frame_rate).round().max(1.0) as u64
    };
    let rotation_deg = rotation(&stream);
    let start = if stream.start_time() == ff::ffi::AV_NOPTS_VALUE {
        0
    } else {
        stream.start_time()
    };
    let index = stream.index();
    let container = input.format().name().to_string();
    Ok(Opened {
        input,
        stream: index,
        time_base,
        start,
        probe: Probe {
            container,
            codec,
            width,
            height,
            duration_s,
            frame_rate,
            frame_count,
            rotation_deg,
            duration_from_container: from_container,
        },
    })
}

/// Clockwise display rotation from the stream's display matrix (or its legacy `rotate` tag).
fn rotation(stream: &ff::format::stream::Stream) -> i32 {
    for sd in stream.side_data() {
        if sd.kind() == ff::codec::packet::side_data::Type::DisplayMatrix && sd.data().len() >= 36 {
            let m: Vec<i32> = sd
                .data()
                .chunks_exact(4)
                .take(9)
                .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            // 16.16 fixed point. A `rotate=90` tag (90 degrees clockwise for display, what
            // ffmpeg's autorotate applies) is stored with atan2(m[1], m[0]) = -90; the test
            // `applies_rotation_metadata` pins this convention with pixels.
            let (a, b) = (m[0] as f64 / 65536.0, m[1] as f64 / 65536.0);
            return normalise_rotation(-b.atan2(a).to_degrees());
        }
    }
    stream
        .metadata()
        .get("rotate")
        .and_then(|r| r.parse::<f64>().ok())
        .map(normalise_rotation)
        .unwrap_or(0)
}

/// Rounds to a multiple of 90 in 0..360.
fn normalise_rotation(deg: f64) -> i32 {
    ((deg / 90.0).round() as i32 * 90).rem_euclid(360)
}

/// Probes a video file.
pub fn probe_path(path: &Path, policy: &MediaPolicy) -> Result<Probe, VideoError> {
    Ok(open(path, policy, Instant::now())?.probe)
}

/// Probes, samples and preprocesses a video file.
pub fn decode_path(
    path: &Path,
    sampling: &FrameSampling,
    policy: &MediaPolicy,
    pre: &Preprocess,
) -> Result<SampledVideo, VideoError> {
    let started = Instant::now();
    let opened = open(path, policy, started)?;
    let instants = sample_timestamps(sampling, opened.probe.duration_s)?;
    if instants.len() > policy.max_sampled_frames {
        return Err(VideoError::TooLarge {
            what: "sampled frames",
            value: instants.len().to_string(),
            limit: policy.max_sampled_frames.to_string(),
        });
    }
    let gap = opened.probe.duration_s / instants.len() as f64;
    if gap >= SEEK_MIN_GAP_S {
        match decode_seeking(opened, &instants, policy, pre, started) {
            Ok(v) => return Ok(v),
            Err(Fallback::Fatal(e)) => return Err(e),
            Err(Fallback::Sequential(why)) => {
                tracing::debug!("seeking failed ({why}); decoding sequentially");
            }
        }
        let reopened = open(path, policy, started)?;
        return decode_sequential(reopened, &instants, policy, pre, started);
    }
    decode_sequential(opened, &instants, policy, pre, started)
}

/// Writes uploaded bytes to a private temporary file and decodes it.
pub fn decode_bytes(
    bytes: &[u8],
    sampling: &FrameSampling,
    policy: &MediaPolicy,
    pre: &Preprocess,
) -> Result<SampledVideo, VideoError> {
    if bytes.is_empty() {
        return Err(VideoError::Empty);
    }
    if bytes.len() as u64 > policy.max_bytes {
        return Err(VideoError::TooLarge {
            what: "upload size",
            value: bytes.len().to_string(),
            limit: policy.max_bytes.to_string(),
        });
    }
    // A private file: a unique name created exclusively (no symlink followed), mode 0600,
    // removed when dropped.
    let mut tmp = tempfile::Builder::new()
        .prefix("vvlm-upload-")
        .tempfile()
        .map_err(|e| VideoError::Io(format!("temporary file: {e}")))?;
    {
        use std::io::Write;
        tmp.write_all(bytes)
            .and_then(|_| tmp.flush())
            .map_err(|e| VideoError::Io(format!("temporary file: {e}")))?;
    }
    decode_path(tmp.path(), sampling, policy, pre)
}

/// Undecodable packets the demuxer may skip in a row before the input is called corrupt.
const MAX_SKIPPED_PACKETS: u32 = 1024;

/// The next packet of `stream`, or None at the end of the input. Bounded: a demuxer that keeps
/// failing (ffmpeg-next's packet iterator retries `InvalidData` forever) stops at
/// [`MAX_SKIPPED_PACKETS`] or at the decode deadline.
fn next_packet(
    input: &mut ff::format::context::Input,
    stream: usize,
    policy: &MediaPolicy,
    started: Instant,
) -> Result<Option<ff::Packet>, VideoError> {
    let mut skipped = 0u32;
    loop {
        let mut packet = ff::Packet::empty();
        match packet.read(input) {
            Ok(()) if packet.stream() == stream => return Ok(Some(packet)),
            Ok(()) => skipped = 0,
            Err(ff::Error::Eof) => return Ok(None),
            Err(ff::Error::InvalidData) => {
                skipped += 1;
                if skipped > MAX_SKIPPED_PACKETS {
                    return Err(VideoError::Corrupt(
                        "the demuxer keeps failing on invalid data".into(),
                    ));
                }
            }
            Err(ff::Error::Exit) => return Err(VideoError::Timeout(policy.decode_timeout_s)),
            // Other errors end the input (as ffmpeg's own tools treat them).
            Err(_) => return Ok(None),
        }
        check_budget(0, policy, started)?;
    }
}

/// Seek when sampled instants are at least this far apart (seconds); closer instants are
/// cheaper to reach by decoding straight through.
const SEEK_MIN_GAP_S: f64 = 4.0;

enum Fallback {
    Sequential(String),
    Fatal(VideoError),
}

struct Converter {
    scaler: Option<(ff::software::scaling::Context, ff::format::Pixel, u32, u32)>,
}

impl Converter {
    fn rgb(&mut self, frame: &ff::frame::Video, rotation: i32) -> Result<RgbImage, VideoError> {
        let (fmt, w, h) = (frame.format(), frame.width(), frame.height());
        if w == 0 || h == 0 {
            return Err(VideoError::Corrupt("decoded a frame of size 0".into()));
        }
        let rebuild =
            !matches!(&self.scaler, Some((_, f, sw, sh)) if *f == fmt && *sw == w && *sh == h);
        if rebuild {
            let ctx = ff::software::scaling::Context::get(
                fmt,
                w,
                h,
                ff::format::Pixel::RGB24,
                w,
                h,
                ff::software::scaling::Flags::BILINEAR,
            )
            .map_err(|e| VideoError::UnsupportedCodec(format!("pixel format {fmt:?}: {e}")))?;
            self.scaler = Some((ctx, fmt, w, h));
        }
        let (scaler, ..) = self.scaler.as_mut().expect("scaler built above");
        let mut rgb = ff::frame::Video::empty();
        scaler
            .run(frame, &mut rgb)
            .map_err(|e| VideoError::Corrupt(format!("pixel conversion: {e}")))?;
        let stride = rgb.stride(0);
        let data = rgb.data(0);
        let mut buf = Vec::with_capacity((w * h * 3) as usize);
        for y in 0..h as usize {
            buf.extend_from_slice(&data[y * stride..y * stride + w as usize * 3]);
        }
        let img = RgbImage::from_raw(w, h, buf)
            .ok_or_else(|| VideoError::Corrupt("frame buffer".into()))?;
        Ok(match rotation {
            90 => image::imageops::rotate90(&img),
            180 => image::imageops::rotate180(&img),
            270 => image::imageops::rotate270(&img),
            _ => img,
        })
    }
}

fn new_decoder(
    input: &ff::format::context::Input,
    stream: usize,
    policy: &MediaPolicy,
) -> Result<ff::decoder::Video, VideoError> {
    let s = input.stream(stream).ok_or(VideoError::NoVideoStream)?;
    let mut ctx = ff::codec::context::Context::from_parameters(s.parameters())
        .map_err(|e| VideoError::UnsupportedCodec(e.to_string()))?;
    // Frame threading on every core (libavcodec's default is one thread).
    let mut threading = ff::codec::threading::Config::count(
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
    );
    threading.kind = ff::codec::threading::Type::Frame;
    ctx.set_threading(threading);
    // The decoder itself refuses frames over the pixel limit (a stream may change resolution
    // after the probe), before it allocates them.
    // SAFETY: `ctx` owns a valid, not yet opened AVCodecContext; `max_pixels` is a plain field.
    unsafe {
        (*ctx.as_mut_ptr()).max_pixels = policy.max_pixels_per_frame.min(i64::MAX as u64) as i64;
    }
    let dec = ctx
        .decoder()
        .video()
        .map_err(|e| VideoError::UnsupportedCodec(e.to_string()))?;
    Ok(dec)
}

/// Every decoded frame is held to the size limits, not only the probe's first: a stream may
/// change resolution mid-way.
fn check_frame(frame: &ff::frame::Video, policy: &MediaPolicy) -> Result<(), VideoError> {
    check_dims(frame.width(), frame.height(), policy)
}

fn check_budget(decoded: u64, policy: &MediaPolicy, started: Instant) -> Result<(), VideoError> {
    if decoded > policy.max_decoded_frames {
        return Err(VideoError::TooLarge {
            what: "decoded frames",
            value: decoded.to_string(),
            limit: policy.max_decoded_frames.to_string(),
        });
    }
    let el = started.elapsed().as_secs_f64();
    if el > policy.decode_timeout_s {
        return Err(VideoError::Timeout(policy.decode_timeout_s));
    }
    Ok(())
}

#[derive(Clone, Copy)]
struct Clock {
    start: i64,
    time_base: f64,
    frame_rate: f64,
}

impl Clock {
    fn of(o: &Opened) -> Self {
        Self {
            start: o.start,
            time_base: o.time_base,
            frame_rate: o.probe.frame_rate,
        }
    }
}

fn frame_time(frame: &ff::frame::Video, c: &Clock, counter: u64) -> f64 {
    match frame.timestamp().or(frame.pts()) {
        Some(ts) => (ts - c.start) as f64 * c.time_base,
        None if c.frame_rate > 0.0 => counter as f64 / c.frame_rate,
        None => 0.0,
    }
}

/// Decodes every frame in order and keeps the ones on screen at the requested instants.
fn decode_sequential(
    mut o: Opened,
    instants: &[f64],
    policy: &MediaPolicy,
    pre: &Preprocess,
    started: Instant,
) -> Result<SampledVideo, VideoError> {
    let mut dec = new_decoder(&o.input, o.stream, policy)?;
    let mut conv = Converter { scaler: None };
    let clock = Clock::of(&o);
    let rotation = o.probe.rotation_deg;
    // Instants in ascending order with their output slot.
    let mut order: Vec<usize> = (0..instants.len()).collect();
    order.sort_by(|&a, &b| instants[a].total_cmp(&instants[b]));
    let n = 3 * (pre.size * pre.size) as usize;
    let mut pixels = vec![0f32; instants.len() * n];
    let mut frames: Vec<Option<SampledFrame>> = vec![None; instants.len()];
    let mut next = 0usize;
    let mut prev: Option<(ff::frame::Video, f64, u64)> = None;
    let mut prev_pixels: Option<Vec<f32>> = None;
    let mut decoded = 0u64;
    let mut cur = ff::frame::Video::empty();
    let mut corrupt_packets = 0u32;
    let assign = |prev: &(ff::frame::Video, f64, u64),
                  prev_pixels: &mut Option<Vec<f32>>,
                  conv: &mut Converter,
                  slot: usize,
                  frames: &mut Vec<Option<SampledFrame>>,
                  pixels: &mut Vec<f32>|
     -> Result<(), VideoError> {
        if prev_pixels.is_none() {
            let rgb = conv.rgb(&prev.0, rotation)?;
            *prev_pixels = Some(preprocess_rgb(&rgb, pre));
        }
        pixels[slot * n..(slot + 1) * n]
            .copy_from_slice(prev_pixels.as_ref().expect("converted above"));
        frames[slot] = Some(SampledFrame {
            index: prev.2,
            timestamp_s: prev.1,
            requested_s: instants[slot],
        });
        Ok(())
    };
    let on_frame = |cur: &mut ff::frame::Video,
                    prev: &mut Option<(ff::frame::Video, f64, u64)>,
                    prev_pixels: &mut Option<Vec<f32>>,
                    conv: &mut Converter,
                    next: &mut usize,
                    decoded: &mut u64,
                    frames: &mut Vec<Option<SampledFrame>>,
                    pixels: &mut Vec<f32>|
     -> Result<(), VideoError> {
        let t = frame_time(cur, &clock, *decoded);
        // Instants before this frame are shown by the previous frame (or this one, if first).
        while *next < order.len() && instants[order[*next]] < t - 1e-9 {
            match prev.as_ref() {
                Some(p) => assign(p, prev_pixels, conv, order[*next], frames, pixels)?,
                None => break,
            }
            *next += 1;
        }
        let taken = std::mem::replace(cur, ff::frame::Video::empty());
        *prev = Some((taken, t, *decoded));
        *prev_pixels = None;
        // If instants precede the very first frame, the first frame serves them.
        if *decoded == 0 {
            while *next < order.len() && instants[order[*next]] < t - 1e-9 {
                assign(
                    prev.as_ref().expect("set above"),
                    prev_pixels,
                    conv,
                    order[*next],
                    frames,
                    pixels,
                )?;
                *next += 1;
            }
        }
        *decoded += 1;
        Ok(())
    };
    loop {
        if next >= order.len() {
            break;
        }
        let packet = next_packet(&mut o.input, o.stream, policy, started)?;
        let eof = packet.is_none();
        match packet {
            None => {
                let _ = dec.send_eof();
            }
            Some(p) => {
                let sent = dec.send_packet(&p);
                // A parameter change (a new SPS) updates the decoder's dimensions even when
                // the frame is refused for its size (`max_pixels`): say so, do not skip it.
                check_dims(dec.width(), dec.height(), policy)?;
                if sent.is_err() {
                    corrupt_packets += 1;
                    if corrupt_packets > 64 {
                        return Err(VideoError::Corrupt("too many undecodable packets".into()));
                    }
                }
            }
        }
        while dec.receive_frame(&mut cur).is_ok() {
            check_frame(&cur, policy)?;
            on_frame(
                &mut cur,
                &mut prev,
                &mut prev_pixels,
                &mut conv,
                &mut next,
                &mut decoded,
                &mut frames,
                &mut pixels,
            )?;
            check_budget(decoded, policy, started)?;
        }
        if eof {
            break;
        }
    }
    let Some(last) = prev.as_ref() else {
        return Err(VideoError::Corrupt("no frame could be decoded".into()));
    };
    while next < order.len() {
        assign(
            last,
            &mut prev_pixels,
            &mut conv,
            order[next],
            &mut frames,
            &mut pixels,
        )?;
        next += 1;
    }
    let frames: Vec<SampledFrame> = frames
        .into_iter()
        .map(|f| f.expect("every instant assigned"))
        .collect();
    Ok(SampledVideo {
        probe: o.probe.clone(),
        frames,
        pixels,
        size: pre.size,
        decoded_frames: decoded,
        seeked: false,
    })
}

/// Seeks to the keyframe before each instant and decodes forward to it.
fn decode_seeking(
    mut o: Opened,
    instants: &[f64],
    policy: &MediaPolicy,
    pre: &Preprocess,
    started: Instant,
) -> Result<SampledVideo, Fallback> {
    let fatal = Fallback::Fatal;
    let mut dec = new_decoder(&o.input, o.stream, policy).map_err(fatal)?;
    let mut conv = Converter { scaler: None };
    let clock = Clock::of(&o);
    let n = 3 * (pre.size * pre.size) as usize;
    let mut pixels = vec![0f32; instants.len() * n];
    let mut frames = Vec::with_capacity(instants.len());
    let mut decoded = 0u64;
    let stream = o.stream;
    for (slot, &t) in instants.iter().enumerate() {
        let target = (t * f64::from(ff::ffi::AV_TIME_BASE)) as i64;
        o.input
            .seek(target, i64::MIN..target.saturating_add(1))
            .map_err(|e| Fallback::Sequential(format!("seek to {t:.3}s: {e}")))?;
        dec.flush();
        let mut prev: Option<(ff::frame::Video, f64)> = None;
        let mut cur = ff::frame::Video::empty();
        let mut found: Option<(ff::frame::Video, f64)> = None;
        let mut eof = false;
        while found.is_none() && !eof {
            match next_packet(&mut o.input, stream, policy, started).map_err(fatal)? {
                Some(p) => {
                    let _ = dec.send_packet(&p);
                    check_dims(dec.width(), dec.height(), policy).map_err(fatal)?;
                }
                None => {
                    let _ = dec.send_eof();
                    eof = true;
                }
            }
            while dec.receive_frame(&mut cur).is_ok() {
                check_frame(&cur, policy).map_err(fatal)?;
                decoded += 1;
                check_budget(decoded, policy, started).map_err(fatal)?;
                let ft = frame_time(&cur, &clock, 0);
                if ft > t + 1e-9 {
                    match prev.take() {
                        Some(p) => found = Some(p),
                        None if ft - t > 0.5 / o.probe.frame_rate.max(1.0) + 1e-3 => {
                            return Err(Fallback::Sequential(format!(
                                "seek to {t:.3}s landed at {ft:.3}s"
                            )));
                        }
                        None => {
                            found =
                                Some((std::mem::replace(&mut cur, ff::frame::Video::empty()), ft))
                        }
                    }
                    break;
                }
                prev = Some((std::mem::replace(&mut cur, ff::frame::Video::empty()), ft));
            }
        }
        let (frame, ft) = match found.or(prev) {
            Some(f) => f,
            None => {
                return Err(Fallback::Sequential(format!(
                    "no frame after seeking to {t:.3}s"
                )))
            }
        };
        let rgb = conv.rgb(&frame, o.probe.rotation_deg).map_err(fatal)?;
        pixels[slot * n..(slot + 1) * n].copy_from_slice(&preprocess_rgb(&rgb, pre));
        frames.push(SampledFrame {
            index: (ft * o.probe.frame_rate).round().max(0.0) as u64,
            timestamp_s: ft,
            requested_s: t,
        });
    }
    Ok(SampledVideo {
        probe: o.probe.clone(),
        frames,
        pixels,
        size: pre.size,
        decoded_frames: decoded,
        seeked: true,
    })
}
