//! Timing wheel throughput: 1,000,000 timers with deadlines spread over 0–60 s (so they land in
//! levels 0–2), reported per timer via `Throughput::Elements`.
//!
//! Quick pass: `cargo bench --bench timer_wheel -- --quick`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use _core::timer::{TimerKey, TimerWheel};
use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};

const TIMERS: usize = 1_000_000;
const SPREAD_US: u64 = 60_000_000;

/// Deadline offsets, precomputed so the benches time the wheel, not the random numbers.
fn offsets() -> Vec<Duration> {
    let mut rng = fastrand::Rng::with_seed(0x7157);
    (0..TIMERS).map(|_| Duration::from_micros(rng.u64(0..SPREAD_US))).collect()
}

/// A group sized so the whole file runs in well under 30 s: an iteration handles a million
/// timers, so ten samples of a few iterations each are plenty.
fn group<'a>(c: &'a mut Criterion, name: &str) -> BenchmarkGroup<'a, WallTime> {
    let mut group = c.benchmark_group(name);
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(3));
    group.throughput(Throughput::Elements(TIMERS as u64));
    group
}

fn insert_cancel(c: &mut Criterion) {
    let origin = Instant::now();
    let deadlines: Vec<Instant> = offsets().into_iter().map(|d| origin + d).collect();
    let mut shuffled: Vec<usize> = (0..TIMERS).collect();
    fastrand::Rng::with_seed(0xCA9C).shuffle(&mut shuffled);
    // One wheel across iterations: after the first, the slab has grown and is only reused.
    let mut wheel = TimerWheel::new(origin);
    let mut keys: Vec<TimerKey> = Vec::with_capacity(TIMERS);

    let mut group = group(c, "timer_wheel");
    // Cancelled in the order set, as timeouts of similar length mostly are.
    group.bench_function("insert_cancel_1m", |b| {
        b.iter(|| {
            keys.clear();
            for (i, &deadline) in deadlines.iter().enumerate() {
                keys.push(wheel.insert(deadline, i));
            }
            for &key in &keys {
                black_box(wheel.cancel(key));
            }
        });
        assert!(wheel.is_empty());
    });
    // Cancelled in random order: the worst case, where every cancel and both its list
    // neighbours are cache misses in a slab far bigger than the cache.
    group.bench_function("insert_cancel_shuffled_1m", |b| {
        b.iter(|| {
            keys.clear();
            for (i, &deadline) in deadlines.iter().enumerate() {
                keys.push(wheel.insert(deadline, i));
            }
            for &i in &shuffled {
                black_box(wheel.cancel(keys[i]));
            }
        });
        assert!(wheel.is_empty());
    });
    group.finish();
}

fn insert_expire(c: &mut Criterion) {
    let offsets = offsets();
    let origin = Instant::now();
    let mut wheel = TimerWheel::new(origin);
    // The wheel's clock only moves forward, so each iteration starts where the last one ended.
    let mut now = origin;
    let mut fired = Vec::with_capacity(TIMERS);

    let mut group = group(c, "timer_wheel");
    // A driver that wakes at each `next_deadline` (one expire per occupied millisecond, plus
    // cascades) until the wheel is empty.
    group.bench_function("insert_expire_driven_1m", |b| {
        b.iter(|| {
            for (i, &offset) in offsets.iter().enumerate() {
                wheel.insert(now + offset, i);
            }
            while let Some(at) = wheel.next_deadline() {
                now = at;
                fired.clear();
                wheel.expire(now, &mut fired);
                black_box(&fired);
            }
        });
    });
    // One `expire` call that jumps past every deadline.
    group.bench_function("insert_expire_jump_1m", |b| {
        b.iter(|| {
            for (i, &offset) in offsets.iter().enumerate() {
                wheel.insert(now + offset, i);
            }
            now += Duration::from_micros(SPREAD_US) + Duration::from_millis(1);
            fired.clear();
            wheel.expire(now, &mut fired);
            assert_eq!(fired.len(), TIMERS);
        });
    });
    group.finish();
}

criterion_group!(benches, insert_cancel, insert_expire);
criterion_main!(benches);
