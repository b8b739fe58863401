//! The layer reader on its own: every read mode returns exactly the files' data regions, cycle
//! after cycle; a file damaged while the reader runs surfaces as an error naming it; dropping
//! the reader early (mid-cycle, after an error) returns; a FIFO in place of a file is an error,
//! not a hang.

use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use rabbit_core::reader::{measure_read, LayerReader, ReadMode};
use rabbit_split::layout::UnitKind;
use rabbit_split::manifest::UnitEntry;

/// Writes `n` unit files whose data regions start at 4096 and have awkward lengths (not
/// multiples of the page, the last one ending at end of file like a real split).
fn units(dir: &Path, n: usize) -> Vec<(UnitEntry, Vec<u8>)> {
    (0..n)
        .map(|i| {
            let len = 3 * 4096 + 517 * (i + 1);
            let data: Vec<u8> = (0..len).map(|k| (k * 31 + i * 7) as u8).collect();
            let file = format!("layer.{i:03}.safetensors");
            let mut bytes = vec![0xAA; 4096];
            bytes.extend_from_slice(&data);
            std::fs::write(dir.join(&file), &bytes).unwrap();
            let entry = UnitEntry {
                name: format!("layer.{i:03}"),
                kind: UnitKind::Layer(i),
                file,
                size: bytes.len() as u64,
                checksum: String::new(),
                data_offset: 4096,
                data_len: len as u64,
                tensors: vec![],
                quantized: vec![],
            };
            (entry, data)
        })
        .collect()
}

/// Runs `f` on its own thread and fails if it has not returned within a minute: a bounded join
/// for what must not hang (a generous bound, not a performance figure).
fn within_a_minute<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(v) => v,
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("{what} hangs"),
        Err(e) => panic!("{what} panicked ({e})"),
    }
}

/// With unit 0 of five just taken (and `reader` at depth 1, so it holds at most units 1 and
/// 2), cuts unit 4's file short and reads on: returns the error that must come.
fn cut_unit_4_and_read_on(
    reader: &mut LayerReader,
    dir: &Path,
    units: &[(UnitEntry, Vec<u8>)],
) -> rabbit_core::CoreError {
    let (u, _) = reader.next(0).unwrap();
    reader.recycle(0, u.bytes);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join(&units[4].0.file))
        .unwrap();
    f.set_len(4096 + 100).unwrap();
    drop(f);
    (|| {
        for slot in 1..5 {
            let (u, _) = reader.next(slot)?;
            reader.recycle(slot, u.bytes);
        }
        Ok::<_, rabbit_core::CoreError>(())
    })()
    .expect_err("a unit cut short must not read as complete")
}

#[test]
fn every_mode_reads_exactly_the_data_regions_cycle_after_cycle() {
    let tmp = tempfile::tempdir().unwrap();
    let units = units(tmp.path(), 3);
    let refs: Vec<&UnitEntry> = units.iter().map(|(u, _)| u).collect();
    for mode in [ReadMode::Map, ReadMode::Copy, ReadMode::Direct] {
        let mut reader = LayerReader::start(tmp.path(), &refs, 2, mode).unwrap();
        for sweep in 0..3 {
            for (slot, (_, want)) in units.iter().enumerate() {
                let (unit, _) = reader.next(slot).unwrap();
                assert_eq!(unit.slot, slot);
                assert!(
                    unit.bytes.as_contiguous() == Some(want.as_slice()),
                    "{mode:?} sweep {sweep} slot {slot}"
                );
                reader.recycle(slot, unit.bytes);
            }
        }
        let (bytes, _) = measure_read(tmp.path(), &refs, mode, false).unwrap();
        assert_eq!(
            bytes,
            units.iter().map(|(u, _)| u.data_len).sum::<u64>(),
            "{mode:?}"
        );
    }
}

#[test]
fn a_file_truncated_under_the_reader_is_an_error_naming_it() {
    for mode in [ReadMode::Map, ReadMode::Copy, ReadMode::Direct] {
        let tmp = tempfile::tempdir().unwrap();
        let units = units(tmp.path(), 5);
        let refs: Vec<&UnitEntry> = units.iter().map(|(u, _)| u).collect();
        let mut reader = LayerReader::start(tmp.path(), &refs, 1, mode).unwrap();
        let msg = cut_unit_4_and_read_on(&mut reader, tmp.path(), &units).to_string();
        assert!(msg.contains("layer.004.safetensors"), "{mode:?}: {msg}");
        assert!(msg.contains("shorter than the manifest"), "{mode:?}: {msg}");
        within_a_minute(
            &format!("{mode:?}: dropping the reader after an error"),
            move || drop(reader),
        );
    }
}

/// Mapped mode keeps each unit's mappings from one sweep to the next: the bytes stay right
/// sweep after sweep (with page-cache eviction after use too: the reader reads them back), the
/// kept bytes are reported, turning it off unmaps as units come round, and a kept unit whose
/// file is cut short afterwards is still an error naming the file, not a stale view.
#[test]
fn kept_mappings_stay_right_and_are_checked_every_sweep() {
    let tmp = tempfile::tempdir().unwrap();
    let units = units(tmp.path(), 3);
    let refs: Vec<&UnitEntry> = units.iter().map(|(u, _)| u).collect();
    let mut reader = LayerReader::start(tmp.path(), &refs, 1, ReadMode::Map).unwrap();
    let sweep = |reader: &mut LayerReader, units: &[(UnitEntry, Vec<u8>)], label: &str| {
        for (slot, (_, want)) in units.iter().enumerate() {
            let (unit, _) = reader.next(slot).unwrap();
            assert!(
                unit.bytes.as_contiguous() == Some(want.as_slice()),
                "{label}: slot {slot}"
            );
            reader.recycle(slot, unit.bytes);
        }
    };
    sweep(&mut reader, &units, "first");
    sweep(&mut reader, &units, "second");
    let data: u64 = units.iter().map(|(u, _)| u.data_len).sum();
    let kept = reader.kept_mapped_bytes();
    assert!(
        kept >= data && kept <= data + 3 * 8192,
        "kept {kept} of {data}"
    );
    reader.set_evict(true);
    sweep(&mut reader, &units, "evicting");
    sweep(&mut reader, &units, "evicting again");
    reader.set_evict(false);
    reader.set_keep_mappings(false);
    // Up to depth + 1 units were read ahead while keeping; two sweeps drop every mapping.
    sweep(&mut reader, &units, "not keeping");
    sweep(&mut reader, &units, "not keeping again");
    assert_eq!(reader.kept_mapped_bytes(), 0);
    drop(reader);

    // Unit 4 is checked again after the damage (see `cut_unit_4_and_read_on`).
    let tmp = tempfile::tempdir().unwrap();
    let units = self::units(tmp.path(), 5);
    let refs: Vec<&UnitEntry> = units.iter().map(|(u, _)| u).collect();
    let mut reader = LayerReader::start(tmp.path(), &refs, 1, ReadMode::Map).unwrap();
    sweep(&mut reader, &units, "before the damage");
    let msg = cut_unit_4_and_read_on(&mut reader, tmp.path(), &units).to_string();
    assert!(msg.contains("layer.004.safetensors"), "{msg}");
    within_a_minute(
        "dropping a reader with kept mappings after an error",
        move || drop(reader),
    );
}

#[test]
fn dropping_the_reader_mid_cycle_returns_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let units = units(tmp.path(), 4);
    let refs: Vec<&UnitEntry> = units.iter().map(|(u, _)| u).collect();
    for mode in [ReadMode::Map, ReadMode::Copy, ReadMode::Direct] {
        let mut reader = LayerReader::start(tmp.path(), &refs, 2, mode).unwrap();
        let (u, _) = reader.next(0).unwrap();
        // The caller stops early holding a unit, with others queued behind it.
        std::thread::sleep(Duration::from_millis(20));
        within_a_minute(
            &format!("{mode:?}: dropping the reader mid-cycle"),
            move || {
                drop(reader);
                drop(u);
            },
        );
    }
}

#[test]
fn a_fifo_in_place_of_a_unit_file_is_an_error_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let units = units(tmp.path(), 2);
    let victim = tmp.path().join(&units[1].0.file);
    std::fs::remove_file(&victim).unwrap();
    let c = std::ffi::CString::new(victim.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    for mode in [ReadMode::Map, ReadMode::Copy, ReadMode::Direct] {
        let dir = tmp.path().to_path_buf();
        let entries: Vec<UnitEntry> = units.iter().map(|(u, _)| u.clone()).collect();
        // Before: open() of the FIFO blocked for ever, waiting for a writer.
        let err = within_a_minute(&format!("{mode:?}: starting on a FIFO"), move || {
            let refs: Vec<&UnitEntry> = entries.iter().collect();
            LayerReader::start(&dir, &refs, 1, mode)
                .err()
                .map(|e| e.to_string())
        })
        .expect("a FIFO is not a unit file");
        assert!(
            err.contains("layer.001.safetensors") && err.contains("FIFO"),
            "{mode:?}: {err}"
        );
    }
}
