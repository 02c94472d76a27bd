//! Decoding real videos made by the ffmpeg CLI at test time (nothing binary is committed).
//! Frames carry their own index: the left half's luma is `16 + 6 * (N mod 32)`, the right
//! half's `16 + 6 * floor(N / 32)`, so a decoded frame says which frame it is.

use std::path::{Path, PathBuf};
use std::process::Command;
use vvlm_video::{
    decode_bytes, decode_path, probe_path, FrameSampling, MediaPolicy, Preprocess, SampledVideo,
    VideoError,
};

fn tmpdir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("vvlm-video-tests-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn ffmpeg(args: &[&str], out: &Path) {
    let st = Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-y"])
        .args(args)
        .arg(out)
        .status()
        .expect("the ffmpeg CLI is installed (scripts/setup-system installs it)");
    assert!(st.success(), "ffmpeg failed making {}", out.display());
}

/// A video whose frames encode their index; `extra` are encoder options.
fn counter_video(name: &str, seconds: u32, fps: u32, size: &str, extra: &[&str]) -> PathBuf {
    let out = tmpdir().join(name);
    let src = format!(
        "nullsrc=s={size}:r={fps}:d={seconds},geq=lum='if(lt(X,W/2),16+6*mod(N,32),16+6*floor(N/32))':cb=128:cr=128"
    );
    let mut args = vec!["-f", "lavfi", "-i", &src];
    args.extend_from_slice(extra);
    ffmpeg(&args, &out);
    out
}

fn small() -> Preprocess {
    Preprocess {
        size: 16,
        ..Default::default()
    }
}

/// Decoded luma (0-255) of the left and right halves of sampled frame i.
fn halves(v: &SampledVideo, i: usize) -> (f32, f32) {
    let px = v.frame_pixels(i);
    let s = v.size as usize;
    let (mut l, mut r) = (0.0, 0.0);
    for y in 2..s - 2 {
        l += px[y * s + 2] + px[y * s + 3];
        r += px[y * s + s - 3] + px[y * s + s - 4];
    }
    let to255 = |x: f32| (x / (2.0 * (s - 4) as f32) * 0.5 + 0.5) * 255.0;
    (to255(l), to255(r))
}

/// The frame index whose encoding best matches the decoded halves (limited-range YUV -> RGB).
fn decoded_index(v: &SampledVideo, i: usize) -> u64 {
    let (l, r) = halves(v, i);
    let rgb = |y: f32| ((y - 16.0) * 255.0 / 219.0).clamp(0.0, 255.0);
    (0..32 * 32)
        .min_by(|&a: &u64, &b: &u64| {
            let e = |n: u64| {
                (rgb(16.0 + 6.0 * (n % 32) as f32) - l).abs()
                    + (rgb(16.0 + 6.0 * (n / 32) as f32) - r).abs()
            };
            e(a).total_cmp(&e(b))
        })
        .unwrap()
}

#[test]
fn samples_uniform_instants_and_the_right_frames_sequentially() {
    let p = counter_video(
        "seq.mp4",
        3,
        10,
        "64x48",
        &["-c:v", "libx264", "-qp", "0", "-pix_fmt", "yuv420p"],
    );
    let v = decode_path(
        &p,
        &FrameSampling::Uniform { frames: 6 },
        &MediaPolicy::default(),
        &small(),
    )
    .unwrap();
    assert_eq!(v.probe.codec, "h264");
    assert_eq!((v.probe.width, v.probe.height), (64, 48));
    assert!(
        (v.probe.duration_s - 3.0).abs() < 0.05,
        "{}",
        v.probe.duration_s
    );
    assert!(!v.seeked);
    let want = [2u64, 7, 12, 17, 22, 27];
    for (i, f) in v.frames.iter().enumerate() {
        assert_eq!(f.index, want[i], "frame {i}: {f:?}");
        assert!((f.requested_s - (i as f64 + 0.5) * 0.5).abs() < 1e-9);
        assert_eq!(decoded_index(&v, i), want[i], "pixels of sampled frame {i}");
    }
    assert_eq!(v.pixels.len(), 6 * 3 * 16 * 16);
}

#[test]
fn seeks_in_long_videos_and_decodes_only_what_is_needed() {
    let p = counter_video(
        "long.mp4",
        60,
        10,
        "64x48",
        &[
            "-c:v", "libx264", "-qp", "0", "-g", "10", "-pix_fmt", "yuv420p",
        ],
    );
    let v = decode_path(
        &p,
        &FrameSampling::Uniform { frames: 4 },
        &MediaPolicy::default(),
        &small(),
    )
    .unwrap();
    assert!(v.seeked);
    assert!(
        v.decoded_frames < 100,
        "decoded {} of 600 frames",
        v.decoded_frames
    );
    for (i, want) in [75u64, 225, 375, 525].into_iter().enumerate() {
        assert_eq!(
            decoded_index(&v, i),
            want,
            "sampled frame {i}: {:?}",
            v.frames[i]
        );
        assert_eq!(v.frames[i].index, want);
    }
}

#[test]
fn sparse_keyframes_still_sample_correctly() {
    let p = counter_video(
        "sparse.mp4",
        40,
        10,
        "32x32",
        &[
            "-c:v", "libx264", "-qp", "0", "-g", "1000", "-pix_fmt", "yuv420p",
        ],
    );
    let v = decode_path(
        &p,
        &FrameSampling::Uniform { frames: 4 },
        &MediaPolicy::default(),
        &small(),
    )
    .unwrap();
    for (i, want) in [50u64, 150, 250, 350].into_iter().enumerate() {
        assert_eq!(decoded_index(&v, i), want, "sampled frame {i}");
    }
}

#[test]
fn short_and_one_frame_videos_repeat_frames() {
    let p = counter_video(
        "one.mp4",
        1,
        1,
        "32x32",
        &["-c:v", "libx264", "-pix_fmt", "yuv420p"],
    );
    let v = decode_path(
        &p,
        &FrameSampling::Uniform { frames: 8 },
        &MediaPolicy::default(),
        &small(),
    )
    .unwrap();
    assert_eq!(v.frames.len(), 8);
    assert!(v.frames.iter().all(|f| f.index == 0), "{:?}", v.frames);
    let p = counter_video(
        "short.mp4",
        1,
        4,
        "32x32",
        &["-c:v", "libx264", "-qp", "0", "-pix_fmt", "yuv420p"],
    );
    let v = decode_path(
        &p,
        &FrameSampling::Uniform { frames: 8 },
        &MediaPolicy::default(),
        &small(),
    )
    .unwrap();
    let idx: Vec<u64> = v.frames.iter().map(|f| f.index).collect();
    assert_eq!(idx, vec![0, 0, 1, 1, 2, 2, 3, 3]);
}

#[test]
fn decodes_many_codecs_and_containers() {
    let cases: &[(&str, &[&str], &str)] = &[
        (
            "h265.mp4",
            &[
                "-c:v",
                "libx265",
                "-x265-params",
                "log-level=error",
                "-pix_fmt",
                "yuv420p",
            ],
            "hevc",
        ),
        ("mpeg4.mov", &["-c:v", "mpeg4"], "mpeg4"),
        ("vp8.webm", &["-c:v", "libvpx"], "vp8"),
        ("vp9.webm", &["-c:v", "libvpx-vp9"], "vp9"),
        ("vp9.mkv", &["-c:v", "libvpx-vp9"], "vp9"),
        ("av1.mkv", &["-c:v", "libaom-av1", "-cpu-used", "8"], "av1"),
    ];
    for (name, args, codec) in cases {
        let p = counter_video(name, 2, 5, "64x64", args);
        let v = decode_path(
            &p,
            &FrameSampling::Uniform { frames: 4 },
            &MediaPolicy::default(),
            &small(),
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(v.probe.codec, *codec, "{name}");
        assert!(
            (v.probe.duration_s - 2.0).abs() < 0.15,
            "{name}: duration {}",
            v.probe.duration_s
        );
        let idx: Vec<u64> = v.frames.iter().map(|f| f.index).collect();
        assert_eq!(idx, vec![1, 3, 6, 8], "{name}");
    }
}

#[test]
fn webm_without_stream_duration_uses_the_containers() {
    let p = counter_video("dur.webm", 3, 5, "32x32", &["-c:v", "libvpx-vp9"]);
    let probe = probe_path(&p, &MediaPolicy::default()).unwrap();
    assert!(probe.duration_from_container, "{probe:?}");
    assert!((probe.duration_s - 3.0).abs() < 0.1);
}

#[test]
fn applies_rotation_metadata() {
    // Left half white, right half black; rotated 90 degrees clockwise for display, the white
    // half ends on top.
    let src = tmpdir().join("unrotated.mp4");
    ffmpeg(
        &[
            "-f",
            "lavfi",
            "-i",
            "nullsrc=s=64x32:r=5:d=1,geq=lum='if(lt(X,W/2),235,16)':cb=128:cr=128",
            "-c:v",
            "libx264",
            "-pix_fmt",
            "yuv420p",
        ],
        &src,
    );
    let rotated = tmpdir().join("rotated.mp4");
    ffmpeg(
        &[
            "-i",
            src.to_str().unwrap(),
            "-c",
            "copy",
            "-metadata:s:v:0",
            "rotate=90",
        ],
        &rotated,
    );
    let v = decode_path(
        &rotated,
        &FrameSampling::Uniform { frames: 1 },
        &MediaPolicy::default(),
        &small(),
    )
    .unwrap();
    assert_eq!(v.probe.rotation_deg, 90);
    let px = v.frame_pixels(0);
    let s = 16;
    let top: f32 = (0..s).map(|x| px[2 * s + x]).sum::<f32>() / s as f32;
    let bottom: f32 = (0..s).map(|x| px[(s - 3) * s + x]).sum::<f32>() / s as f32;
    assert!(top > 0.8 && bottom < -0.8, "top {top}, bottom {bottom}");
}

#[test]
fn bad_input_is_a_typed_error() {
    let d = tmpdir();
    let policy = MediaPolicy::default();
    let s = FrameSampling::Uniform { frames: 4 };
    assert!(matches!(
        decode_bytes(&[], &s, &policy, &small()),
        Err(VideoError::Empty)
    ));
    let junk: Vec<u8> = (0..5000u32).map(|i| (i * 7919 % 251) as u8).collect();
    assert!(matches!(
        decode_bytes(&junk, &s, &policy, &small()),
        Err(VideoError::NotAVideo(_))
    ));
    // Truncated: the first third of a real file.
    let p = counter_video(
        "trunc-src.mp4",
        4,
        10,
        "64x48",
        &["-c:v", "libx264", "-pix_fmt", "yuv420p"],
    );
    let bytes = std::fs::read(&p).unwrap();
    // ffmpeg writes the index (moov) at the end of an MP4: without it nothing can be located,
    // so the truncated upload is "not a video" (a typed 4xx), not a panic or a hang.
    let r = decode_bytes(&bytes[..bytes.len() / 3], &s, &policy, &small());
    assert!(
        matches!(r, Err(VideoError::NotAVideo(_))),
        "{:?}",
        r.map(|v| v.frames)
    );
    // A streamable container (MPEG-TS) cut short decodes what is there: four frames, from the
    // part that arrived.
    let ts = d.join("trunc.ts");
    ffmpeg(&["-i", p.to_str().unwrap(), "-c", "copy"], &ts);
    let bytes = std::fs::read(&ts).unwrap();
    let v = decode_bytes(&bytes[..bytes.len() / 2], &s, &policy, &small()).unwrap();
    assert_eq!(v.frames.len(), 4);
    assert!(v.decoded_frames < 40, "decoded {} of 40", v.decoded_frames);
    // Audio only.
    let a = d.join("audio.wav");
    ffmpeg(&["-f", "lavfi", "-i", "sine=frequency=440:duration=1"], &a);
    assert!(matches!(
        decode_path(&a, &s, &policy, &small()),
        Err(VideoError::NoVideoStream)
    ));
    // Limits.
    let tight = MediaPolicy {
        max_pixels_per_frame: 1000,
        ..Default::default()
    };
    assert!(matches!(
        decode_path(&p, &s, &tight, &small()),
        Err(VideoError::TooLarge { .. })
    ));
    let short = MediaPolicy {
        max_duration_s: 1.0,
        ..Default::default()
    };
    assert!(matches!(
        decode_path(&p, &s, &short, &small()),
        Err(VideoError::TooLarge { .. })
    ));
    let few = MediaPolicy {
        max_sampled_frames: 2,
        ..Default::default()
    };
    assert!(matches!(
        decode_path(&p, &s, &few, &small()),
        Err(VideoError::TooLarge { .. })
    ));
    let tiny = MediaPolicy {
        max_bytes: 10,
        ..Default::default()
    };
    assert!(matches!(
        decode_bytes(&bytes, &s, &tiny, &small()),
        Err(VideoError::TooLarge { .. })
    ));
    let work = MediaPolicy {
        max_decoded_frames: 5,
        ..Default::default()
    };
    assert!(matches!(
        decode_path(&p, &s, &work, &small()),
        Err(VideoError::TooLarge { .. })
    ));
    // From bytes works the same as from a path.
    let v = decode_bytes(&bytes, &s, &policy, &small()).unwrap();
    assert_eq!(v.frames.len(), 4);
}

/// Hostile input: an uploaded HLS playlist naming a local file used to make ffmpeg read that
/// file (bypassing the file:// allow-list) and, where the segment did not parse, spin forever
/// on InvalidData. Playlists, manifests and concat scripts are not containers vvlm opens.
#[test]
fn playlists_and_concat_scripts_are_refused_at_once() {
    let target = counter_video(
        "secret.mp4",
        1,
        5,
        "32x32",
        &["-c:v", "libx264", "-pix_fmt", "yuv420p"],
    );
    let ts = tmpdir().join("secret.ts");
    ffmpeg(&["-i", target.to_str().unwrap(), "-c", "copy"], &ts);
    let s = FrameSampling::Uniform { frames: 2 };
    let policy = MediaPolicy {
        decode_timeout_s: 5.0,
        ..Default::default()
    };
    for (what, body) in [
        (
            "hls (mp4)",
            format!(
                "#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\n{}\n#EXT-X-ENDLIST\n",
                target.display()
            ),
        ),
        (
            "hls (ts)",
            format!(
                "#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\nfile://{}\n#EXT-X-ENDLIST\n",
                ts.display()
            ),
        ),
        (
            "concat",
            format!("ffconcat version 1.0\nfile '{}'\n", ts.display()),
        ),
    ] {
        let t = std::time::Instant::now();
        let r = decode_bytes(body.as_bytes(), &s, &policy, &small());
        assert!(matches!(r, Err(VideoError::NotAVideo(_))), "{what}: {r:?}");
        assert!(
            t.elapsed().as_secs_f64() < 2.0,
            "{what} took {:?}",
            t.elapsed()
        );
    }
}

/// Hostile input: a stream that starts at 64x64 (what the probe sees) and switches to
/// 4096x4096 must not get past the frame-size limits.
#[test]
fn a_stream_that_grows_mid_way_is_held_to_the_frame_limits() {
    let d = tmpdir();
    let (a, b, joined) = (d.join("grow-a.ts"), d.join("grow-b.ts"), d.join("grow.ts"));
    let enc = [
        "-c:v",
        "libx264",
        "-pix_fmt",
        "yuv420p",
        "-preset",
        "ultrafast",
    ];
    let mut args = vec!["-f", "lavfi", "-i", "color=c=red:s=64x64:r=5:d=8"];
    args.extend_from_slice(&enc);
    ffmpeg(&args, &a);
    let mut args = vec!["-f", "lavfi", "-i", "color=c=blue:s=4096x4096:r=5:d=1"];
    args.extend_from_slice(&enc);
    args.extend_from_slice(&["-output_ts_offset", "8"]);
    ffmpeg(&args, &b);
    let mut bytes = std::fs::read(&a).unwrap();
    bytes.extend(std::fs::read(&b).unwrap());
    std::fs::write(&joined, &bytes).unwrap();
    let policy = MediaPolicy {
        max_side: 1024,
        max_pixels_per_frame: 1 << 20,
        ..Default::default()
    };
    assert_eq!(probe_path(&joined, &policy).unwrap().width, 64);
    let r = decode_path(
        &joined,
        &FrameSampling::Uniform { frames: 8 },
        &policy,
        &small(),
    );
    assert!(
        matches!(
            r,
            Err(VideoError::TooLarge { .. }) | Err(VideoError::Corrupt(_))
        ),
        "{:?}",
        r.map(|v| v.frames)
    );
}

/// Uploads are written to a private temporary file: unique, not world-readable, removed after.
#[cfg(unix)]
#[test]
fn uploads_leave_no_temporary_file_behind() {
    let p = counter_video(
        "tmp.mp4",
        1,
        5,
        "32x32",
        &["-c:v", "libx264", "-pix_fmt", "yuv420p"],
    );
    let before: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("vvlm-upload-"))
        .map(|e| e.file_name())
        .collect();
    let v = decode_bytes(
        &std::fs::read(&p).unwrap(),
        &FrameSampling::Uniform { frames: 2 },
        &MediaPolicy::default(),
        &small(),
    )
    .unwrap();
    assert_eq!(v.frames.len(), 2);
    let after: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("vvlm-upload-"))
        .map(|e| e.file_name())
        .filter(|n| !before.contains(n))
        .collect();
    assert!(after.is_empty(), "left behind: {after:?}");
}

/// Hostile input: a container with many streams (each costs the demuxer memory; a 1000-stream
/// MKV cost ~1 GB per request) is refused; a few streams are fine.
#[test]
fn containers_with_too_many_streams_are_refused() {
    let d = tmpdir();
    let make = |n: usize, name: &str| {
        let out = d.join(name);
        let mut args: Vec<String> = ["-f", "lavfi", "-i", "color=c=green:s=16x16:r=5:d=0.4"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        for _ in 0..n {
            args.extend(["-map".to_string(), "0:v".to_string()]);
        }
        args.extend(["-c:v", "ffv1"].iter().map(|s| s.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        ffmpeg(&refs, &out);
        out
    };
    let s = FrameSampling::Uniform { frames: 2 };
    let policy = MediaPolicy::default();
    let few = make(3, "streams-3.mkv");
    assert_eq!(
        decode_path(&few, &s, &policy, &small())
            .unwrap()
            .frames
            .len(),
        2
    );
    let many = make(40, "streams-40.mkv");
    let r = decode_path(&many, &s, &policy, &small());
    assert!(
        matches!(r, Err(VideoError::NotAVideo(_))),
        "{:?}",
        r.map(|v| v.probe)
    );
}
