//! Fuzzing the parsers every upload goes through: the header probe and framing check the API
//! runs ([`check`]) and the decoder the worker runs ([`decode`]). Coverage-guided fuzzers need
//! a nightly toolchain; on stable this mutates the committed seed corpus (`tests/corpus/images`:
//! every accepted format and variant, and hostile files) with proptest: bit flips, byte
//! overwrites, cuts, insertions and splices of two files. Whatever the bytes, neither function
//! may panic, loop or allocate past the limits; a page cut anywhere that passes the API's check
//! still decodes; and a PNG that passes (all of it is under checksums) always decodes. CI runs the default number of cases;
//! `PROPTEST_CASES=100000` runs a longer campaign.

use ocr_engine::decode::{check, decode, DecodeLimits, ImageFormat};
use proptest::prelude::*;
use std::path::PathBuf;

fn corpus() -> &'static [(String, Vec<u8>)] {
    static CORPUS: std::sync::OnceLock<Vec<(String, Vec<u8>)>> = std::sync::OnceLock::new();
    CORPUS.get_or_init(read_corpus)
}

fn read_corpus() -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/images");
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.expect("a corpus entry").path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&path).expect("a corpus file"))
        })
        .collect();
    files.sort();
    assert!(files.len() >= 10, "the seed corpus is missing");
    files
}

/// Small limits, so that the pixel checks are exercised by the corpus's small pages too.
const TIGHT: DecodeLimits = DecodeLimits {
    max_bytes: 1 << 20,
    max_pixels: 40 * 24,
    max_side: 64,
};

fn within(limits: &DecodeLimits, width: u32, height: u32) -> bool {
    u64::from(width) * u64::from(height) <= limits.max_pixels
        && width <= limits.max_side
        && height <= limits.max_side
}

/// Runs both parsers and checks what holds for any input.
fn parse_any(bytes: &[u8], limits: &DecodeLimits) -> Result<(), TestCaseError> {
    let checked = check(bytes, limits);
    let decoded = decode(bytes, limits);
    if let Ok(info) = &checked {
        prop_assert!(within(limits, info.width, info.height), "{info:?}");
    }
    if let Ok(image) = &decoded {
        prop_assert!(within(limits, image.width(), image.height()));
    }
    if let (Ok(info), Err(err)) = (&checked, &decoded) {
        // Every PNG byte up to IEND is under a checksum: one that passes is whole. (Other
        // formats keep compressed streams the check does not read: a damaged one inside
        // intact framing is the worker's to find, and fails the job as bad input.)
        prop_assert!(
            info.format != ImageFormat::Png,
            "a PNG passed the check but does not decode: {err}"
        );
    }
    Ok(())
}

#[test]
fn every_seed_is_judged_as_named() {
    let limits = DecodeLimits::default();
    for (name, bytes) in corpus() {
        let checked = check(bytes, &limits);
        if name.starts_with("page") {
            let info = checked.unwrap_or_else(|e| panic!("{name}: {e}"));
            let image = decode(bytes, &limits).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(
                (image.width(), image.height()),
                (info.width, info.height),
                "{name}"
            );
        } else {
            assert!(checked.is_err(), "{name} is hostile but passed the check");
        }
    }
}

#[derive(Debug, Clone)]
enum Mutation {
    FlipBit {
        at: usize,
        bit: u8,
    },
    Overwrite {
        at: usize,
        bytes: Vec<u8>,
    },
    Cut {
        at: usize,
    },
    Insert {
        at: usize,
        bytes: Vec<u8>,
    },
    /// The head of this seed, the tail of another.
    Splice {
        other: usize,
        at: usize,
        from: usize,
    },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let position = any::<usize>();
    prop_oneof![
        (position, 0u8..8).prop_map(|(at, bit)| Mutation::FlipBit { at, bit }),
        (position, prop::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(at, bytes)| Mutation::Overwrite { at, bytes }),
        position.prop_map(|at| Mutation::Cut { at }),
        (position, prop::collection::vec(any::<u8>(), 1..64))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        (any::<usize>(), position, position).prop_map(|(other, at, from)| Mutation::Splice {
            other,
            at,
            from
        }),
    ]
}

fn apply(seed: &[u8], corpus: &[(String, Vec<u8>)], mutation: &Mutation) -> Vec<u8> {
    let mut bytes = seed.to_vec();
    let at = |n: usize, len: usize| if len == 0 { 0 } else { n % len };
    match mutation {
        Mutation::FlipBit { at: n, bit } => {
            let i = at(*n, bytes.len());
            if let Some(b) = bytes.get_mut(i) {
                *b ^= 1 << bit;
            }
        }
        Mutation::Overwrite { at: n, bytes: new } => {
            let start = at(*n, bytes.len());
            for (i, b) in new.iter().enumerate() {
                if let Some(slot) = bytes.get_mut(start + i) {
                    *slot = *b;
                }
            }
        }
        Mutation::Cut { at: n } => bytes.truncate(at(*n, bytes.len())),
        Mutation::Insert { at: n, bytes: new } => {
            let i = at(*n, bytes.len() + 1);
            bytes.splice(i..i, new.iter().copied());
        }
        Mutation::Splice { other, at: n, from } => {
            let tail = &corpus[other % corpus.len()].1;
            bytes.truncate(at(*n, bytes.len()));
            bytes.extend_from_slice(&tail[at(*from, tail.len())..]);
        }
    }
    bytes
}

/// 2048 cases a test in CI (a second or so); `PROPTEST_CASES` sets a longer campaign.
fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(2048);
    ProptestConfig::with_cases(cases)
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn mutated_seeds_never_panic_nor_pass_a_damaged_png(
        seed in any::<usize>(),
        mutations in prop::collection::vec(mutation(), 1..4),
        tight in any::<bool>(),
    ) {
        let corpus = corpus();
        let mut bytes = corpus[seed % corpus.len()].1.clone();
        for m in &mutations {
            bytes = apply(&bytes, corpus, m);
        }
        let limits = if tight { TIGHT } else { DecodeLimits::default() };
        parse_any(&bytes, &limits)?;
    }

    /// What the API lets through, the worker can decode: a page cut anywhere is refused by
    /// the check or still decodes, in every format and variant of the corpus.
    #[test]
    fn no_cut_page_passes_the_check_and_then_fails_to_decode(
        seed in any::<usize>(),
        at in any::<usize>(),
    ) {
        let pages: Vec<&Vec<u8>> = corpus()
            .iter()
            .filter(|(name, _)| name.starts_with("page"))
            .map(|(_, bytes)| bytes)
            .collect();
        let page = pages[seed % pages.len()];
        let cut = &page[..at % page.len()];
        let limits = DecodeLimits::default();
        if let Ok(info) = check(cut, &limits) {
            let decoded = decode(cut, &limits);
            prop_assert!(
                decoded.is_ok(),
                "{:?} cut at {} of {} passed the check: {:?}",
                info.format,
                cut.len(),
                page.len(),
                decoded.err()
            );
        }
    }

    #[test]
    fn arbitrary_bytes_behind_a_format_signature_never_panic(
        signature in prop::sample::select(vec![
            &b"\x89PNG\r\n\x1a\n"[..],
            &b"\xff\xd8\xff"[..],
            &b"II*\0"[..],
            &b"MM\0*"[..],
            &b"RIFF\0\0\0\0WEBP"[..],
            &b"BM"[..],
        ]),
        tail in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        let mut bytes = signature.to_vec();
        bytes.extend_from_slice(&tail);
        parse_any(&bytes, &DecodeLimits::default())?;
    }
}
