//! A hierarchical timing wheel: one structure holds every deadline, so a single driver wakes at
//! `next_deadline()` instead of each timer owning an OS timer or a heap entry. Insert and cancel are O(1); an idle wheel needs no ticking, because the
//! driver sleeps until the next occupied slot rather than stepping through empty milliseconds.
//!
//! Layout: six levels of 64 slots at 1 ms resolution (level `l` slots span `64^l` ms, so the
//! wheel sees 2^36 ms ≈ 795 days ahead). Each level has a `u64` occupancy bitmap, so the next
//! occupied slot is one `trailing_zeros`. Timers live in a slab (a `Vec` plus a free list) and
//! each slot is an intrusive doubly-linked list threaded through the slab by index: after the
//! slab has grown, inserting and cancelling allocate nothing. Keys carry a generation, so a key
//! whose timer fired or was cancelled never reaches a later timer that reuses its slab entry.
//!
//! Time: deadlines round *up* to a whole tick and `now` rounds *down*, so a timer never fires
//! before its deadline. Deadlines further out than the top level's window are parked in the top
//! level and re-placed each time their slot comes round, so they too fire exactly on their tick.
//! The wheel's clock only moves forward: an `expire` with an earlier `now` than a previous one
//! is treated as the latest `now` seen.
//!
//! Not thread-safe by design (no interior mutability): the owner wraps it in a lock.

use std::fmt;
use std::time::{Duration, Instant};

/// Slots per level, as a power of two.
const BITS: u32 = 6;
const SLOTS: usize = 1 << BITS;
const SLOT_MASK: u64 = (1 << BITS) - 1;
const LEVELS: usize = 6;
const TOP: usize = LEVELS - 1;
/// Ticks covered by the whole wheel (one turn of the top level).
const RANGE: u64 = 1 << (BITS * LEVELS as u32);
/// The list of timers already due when inserted; it sits after the wheel's slot lists.
const DUE: usize = LEVELS * SLOTS;
const LISTS: usize = DUE + 1;
/// Ticks are capped here (~146 million years) so tick arithmetic can never overflow.
const TICK_CAP: u64 = 1 << 62;
/// Null link in the intrusive lists and the free list.
const NIL: u32 = u32::MAX;

/// Identifies an inserted timer; stale keys (fired or cancelled) are harmless.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TimerKey {
    index: u32,
    generation: u32,
}

/// A slab entry: a pending timer (`value` is `Some`) linked into one list, or a free entry
/// linked into the free list through `next`.
struct Entry<T> {
    /// The deadline's tick (rounded up); the true due time even when parked elsewhere.
    tick: u64,
    prev: u32,
    next: u32,
    /// Bumped on every release, so keys to an earlier occupant stop matching. It wraps only
    /// after 2^32 reuses of one entry, far beyond the life of any key worth cancelling.
    generation: u32,
    /// Which list (`level * SLOTS + slot`, or `DUE`) the entry is linked into.
    list: u16,
    value: Option<T>,
}

/// A hierarchical timing wheel mapping deadlines to values of type `T`.
pub struct TimerWheel<T> {
    origin: Instant,
    /// The last tick for which `origin + tick ms` is a representable `Instant` (at most
    /// `TICK_CAP`), so turning any stored tick back into an `Instant` cannot fail.
    max_tick: u64,
    /// The latest tick `expire` has processed: every timer with `tick <= elapsed` has fired or
    /// sits in the `DUE` list; every timer in a slot has `tick > elapsed`.
    elapsed: u64,
    /// A lower bound on the ticks in the `DUE` list (exact unless its minimum was cancelled), so
    /// `next_deadline` is not later than any of them.
    due_min: u64,
    occupied: [u64; LEVELS],
    heads: [u32; LISTS],
    tails: [u32; LISTS],
    entries: Vec<Entry<T>>,
    /// Head of the free list, threaded through `Entry::next`.
    free_head: u32,
    /// Entries from here on are free and not on the free list.
    fresh: u32,
    len: usize,
}

impl<T> fmt::Debug for TimerWheel<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Summary only: dumping a million entries helps nobody, and `T` need not be `Debug`.
        f.debug_struct("TimerWheel")
            .field("origin", &self.origin)
            .field("elapsed_ms", &self.elapsed)
            .field("len", &self.len)
            .field("slab", &self.entries.len())
            .finish_non_exhaustive()
    }
}

impl<T> TimerWheel<T> {
    /// A wheel whose tick 0 is `origin`; resolution 1 ms.
    pub fn new(origin: Instant) -> Self {
        TimerWheel {
            origin,
            max_tick: max_tick(origin),
            elapsed: 0,
            due_min: 0,
            occupied: [0; LEVELS],
            heads: [NIL; LISTS],
            tails: [NIL; LISTS],
            entries: Vec::new(),
            free_head: NIL,
            fresh: 0,
            len: 0,
        }
    }

    /// O(1). A deadline in the past (or before origin) fires at the next `expire`.
    /// A timer never fires before its deadline: deadlines round UP to the next whole ms tick.
    ///
    /// Deadlines more than ~146 million years after the origin are clamped to that.
    ///
    /// # Panics
    ///
    /// If `u32::MAX - 1` timers are pending at once (the slab indexes with `u32`).
    pub fn insert(&mut self, deadline: Instant, value: T) -> TimerKey {
        let tick = self.tick_ceil(deadline);
        let index = self.alloc(tick, value);
        let list = if tick <= self.elapsed {
            self.due_min = if self.heads[DUE] == NIL { tick } else { self.due_min.min(tick) };
            DUE
        } else {
            list_for(self.elapsed, tick)
        };
        self.push_back(list, index);
        self.len += 1;
        TimerKey { index, generation: self.entries[index as usize].generation }
    }

    /// O(1). Returns the value if the timer was still pending; None if it already fired or was
    /// cancelled, including a stale key whose slab entry now holds another timer.
    pub fn cancel(&mut self, key: TimerKey) -> Option<T> {
        let entry = self.entries.get(key.index as usize)?;
        if entry.generation != key.generation || entry.value.is_none() {
            return None;
        }
        self.unlink(key.index);
        self.release(key.index)
    }

    /// When the driver should wake next: None when empty. Never later than the earliest pending
    /// deadline (rounded up to its tick). It may be earlier: the start of a higher-level slot
    /// that must be cascaded, in which case `expire` at that time fires nothing and
    /// `next_deadline` moves on.
    ///
    /// It is after the latest `now` given to `expire`, except when a timer was inserted since
    /// with a deadline at or before that `now`'s tick: then it is the earliest such deadline's
    /// tick, not after that `now`, meaning "expire at once".
    pub fn next_deadline(&self) -> Option<Instant> {
        let tick = if self.heads[DUE] == NIL { self.next_expiration()?.1 } else { self.due_min };
        Some(self.instant_at(tick))
    }

    /// Moves every pending timer whose tick is <= now's tick into `fired` (appended in tick
    /// order; timers that were already due when inserted come first, in insertion order),
    /// cascading higher levels as needed. Costs O(levels × occupied slots), however far `now`
    /// jumps. A `now` earlier than a previous call's counts as that call's: it fires only timers
    /// inserted since with deadlines that call had already passed.
    pub fn expire(&mut self, now: Instant, fired: &mut Vec<T>) {
        if self.heads[DUE] != NIL {
            self.process(DUE, fired);
        }
        let now_tick = self.tick_floor(now);
        if now_tick <= self.elapsed {
            return;
        }
        // Visit occupied slots in deadline order; each visit fires the slot's due timers and
        // moves the rest down a level, where a later iteration finds them.
        while let Some((list, deadline)) = self.next_expiration() {
            if deadline > now_tick {
                break;
            }
            self.elapsed = deadline;
            self.process(list, fired);
        }
        // Nothing pending is due by `now_tick`, and every slot still occupied starts after it,
        // so each timer's level and slot stay valid relative to the new `elapsed`.
        self.elapsed = now_tick;
    }

    /// Pending timers.
    pub fn len(&self) -> usize {
        self.len
    }

    /// No pending timers.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The earliest occupied slot and the tick at which it must be processed.
    fn next_expiration(&self) -> Option<(usize, u64)> {
        // Timers in level `l` lie beyond the `elapsed` slot of level `l` but within its turn of
        // level `l + 1`, so every timer in a lower level is due before any in a higher one: the
        // first occupied level holds the earliest slot.
        let level = self.occupied.iter().position(|&bits| bits != 0)?;
        let shift = BITS * level as u32;
        let now_slot = (self.elapsed >> shift) & SLOT_MASK;
        // Search from the slot after `elapsed`'s, wrapping: only the top level wraps (its slots
        // at or before `elapsed`'s are in its next turn); see `list_for`.
        let start = now_slot + 1;
        let slot = (start + u64::from(self.occupied[level].rotate_right(start as u32).trailing_zeros())) & SLOT_MASK;
        let level_range = 1u64 << (shift + BITS);
        let mut deadline = (self.elapsed & !(level_range - 1)) + (slot << shift);
        if deadline <= self.elapsed {
            debug_assert_eq!(level, TOP, "only the top level wraps");
            deadline += level_range;
        }
        Some((level * SLOTS + slot as usize, deadline))
    }

    /// Empties `list`: fires the timers due by `elapsed`, re-places the others (cascading).
    fn process(&mut self, list: usize, fired: &mut Vec<T>) {
        let mut cursor = self.take_list(list);
        while cursor != NIL {
            let entry = &self.entries[cursor as usize];
            // Read before relinking: the entry may join another list, even this slot again.
            let next = entry.next;
            if entry.tick <= self.elapsed {
                if let Some(value) = self.release(cursor) {
                    fired.push(value);
                }
            } else {
                self.push_back(list_for(self.elapsed, entry.tick), cursor);
            }
            cursor = next;
        }
    }

    /// A slab entry for a new timer, reusing a freed one when there is one.
    fn alloc(&mut self, tick: u64, value: T) -> u32 {
        // Recently freed entries first (likely still cached), then the untouched tail.
        let index = if self.free_head != NIL {
            let index = self.free_head;
            self.free_head = self.entries[index as usize].next;
            index
        } else if (self.fresh as usize) < self.entries.len() {
            self.fresh += 1;
            self.fresh - 1
        } else {
            let index = self.entries.len();
            // NIL is reserved, so u32::MAX - 1 entries at most.
            assert!(index < NIL as usize, "TimerWheel: too many pending timers");
            self.entries.push(Entry { tick, prev: NIL, next: NIL, generation: 0, list: 0, value: None });
            self.fresh += 1;
            index as u32
        };
        let entry = &mut self.entries[index as usize];
        debug_assert!(entry.value.is_none());
        entry.tick = tick;
        entry.value = Some(value);
        index
    }

    /// Frees an entry already unlinked from its list and returns its value.
    fn release(&mut self, index: u32) -> Option<T> {
        let entry = &mut self.entries[index as usize];
        let value = entry.value.take();
        debug_assert!(value.is_some(), "released a free entry");
        entry.generation = entry.generation.wrapping_add(1);
        entry.next = self.free_head;
        self.free_head = index;
        self.len -= 1;
        if self.len == 0 {
            // Drained: every entry is free, so forget the free list's order (by now shuffled by
            // the order timers fired or were cancelled in) and refill the slab front to back,
            // which keeps the next burst of timers close together in memory. Generations stay,
            // so old keys remain stale.
            self.free_head = NIL;
            self.fresh = 0;
        }
        value
    }

    fn push_back(&mut self, list: usize, index: u32) {
        let tail = self.tails[list];
        let entry = &mut self.entries[index as usize];
        entry.prev = tail;
        entry.next = NIL;
        entry.list = list as u16;
        if tail == NIL {
            self.heads[list] = index;
            if list < DUE {
                self.occupied[list / SLOTS] |= 1 << (list % SLOTS);
            }
        } else {
            self.entries[tail as usize].next = index;
        }
        self.tails[list] = index;
    }

    fn unlink(&mut self, index: u32) {
        let entry = &self.entries[index as usize];
        let (prev, next, list) = (entry.prev, entry.next, usize::from(entry.list));
        if prev == NIL {
            self.heads[list] = next;
        } else {
            self.entries[prev as usize].next = next;
        }
        if next == NIL {
            self.tails[list] = prev;
        } else {
            self.entries[next as usize].prev = prev;
        }
        if self.heads[list] == NIL && list < DUE {
            self.occupied[list / SLOTS] &= !(1 << (list % SLOTS));
        }
    }

    /// Detaches a whole list, returning its head; the entries keep their links to each other.
    fn take_list(&mut self, list: usize) -> u32 {
        let head = self.heads[list];
        self.heads[list] = NIL;
        self.tails[list] = NIL;
        if list < DUE {
            self.occupied[list / SLOTS] &= !(1 << (list % SLOTS));
        }
        head
    }

    /// `deadline`'s tick, rounded up so the timer cannot fire early.
    fn tick_ceil(&self, deadline: Instant) -> u64 {
        let since = deadline.saturating_duration_since(self.origin);
        let ms =
            since.as_secs().saturating_mul(1000).saturating_add(u64::from(since.subsec_nanos().div_ceil(1_000_000)));
        ms.min(self.max_tick)
    }

    /// `now`'s tick, rounded down so only whole elapsed ticks count.
    fn tick_floor(&self, now: Instant) -> u64 {
        let since = now.saturating_duration_since(self.origin);
        let ms = since.as_secs().saturating_mul(1000).saturating_add(u64::from(since.subsec_millis()));
        ms.min(self.max_tick)
    }

    fn instant_at(&self, tick: u64) -> Instant {
        // Every tick handed here is at most `max_tick`, for which the sum is representable.
        debug_assert!(tick <= self.max_tick);
        self.origin.checked_add(Duration::from_millis(tick)).unwrap_or(self.origin)
    }
}

/// The list a timer due at `tick` belongs in, seen from `elapsed < tick`: the level is the one
/// holding the highest bit in which the two differ, so the timer is cascaded down exactly when
/// `elapsed` reaches the start of its slot.
fn list_for(elapsed: u64, tick: u64) -> usize {
    debug_assert!(tick > elapsed);
    let masked = (elapsed ^ tick) | SLOT_MASK;
    if masked < RANGE {
        let level = (masked.ilog2() / BITS) as usize;
        return level * SLOTS + slot_of(tick, level);
    }
    // Beyond the top level's current turn. The top level's slots at or before `elapsed`'s stand
    // for its next turn, so it sees up to one turn past the start of `elapsed`'s slot; a timer
    // further out is parked in `elapsed`'s own top slot (due one turn on, still before its tick)
    // and re-placed from there.
    let top_shift = BITS * TOP as u32;
    let slot_start = elapsed & !((1u64 << top_shift) - 1);
    TOP * SLOTS + slot_of(tick.min(slot_start + RANGE), TOP)
}

fn slot_of(tick: u64, level: usize) -> usize {
    ((tick >> (BITS * level as u32)) & SLOT_MASK) as usize
}

/// The largest tick (up to `TICK_CAP`) that `origin` can be advanced by, found once by bisection
/// so that converting ticks back to instants never overflows.
fn max_tick(origin: Instant) -> u64 {
    let fits = |tick: u64| origin.checked_add(Duration::from_millis(tick)).is_some();
    if fits(TICK_CAP) {
        return TICK_CAP;
    }
    // Invariant: fits(low), !fits(high).
    let (mut low, mut high) = (0, TICK_CAP);
    while high - low > 1 {
        let mid = low + (high - low) / 2;
        if fits(mid) {
            low = mid;
        } else {
            high = mid;
        }
    }
    low
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn drain<T>(wheel: &mut TimerWheel<T>, now: Instant) -> Vec<T> {
        let mut fired = Vec::new();
        wheel.expire(now, &mut fired);
        fired
    }

    /// Drives the wheel the way a real driver does, waking only at `next_deadline`, up to `end`;
    /// returns each fired value with the tick at which it fired, and the number of wake-ups.
    fn drive(wheel: &mut TimerWheel<u32>, origin: Instant, end: Instant) -> (Vec<(u32, u64)>, usize) {
        let mut out = Vec::new();
        let mut wakeups = 0;
        while let Some(at) = wheel.next_deadline() {
            if at > end {
                break;
            }
            wakeups += 1;
            let tick = at.duration_since(origin).as_millis() as u64;
            out.extend(drain(wheel, at).into_iter().map(|v| (v, tick)));
        }
        (out, wakeups)
    }

    #[test]
    fn empty_wheel_has_no_deadline() {
        let origin = Instant::now();
        let mut wheel = TimerWheel::<u32>::new(origin);
        assert_eq!(wheel.next_deadline(), None);
        assert!(wheel.is_empty());
        assert!(drain(&mut wheel, origin + ms(1_000_000)).is_empty());
        assert_eq!(wheel.next_deadline(), None);
    }

    #[test]
    fn fires_in_tick_order_fifo_within_a_tick() {
        let origin = Instant::now();
        let mut wheel = TimerWheel::new(origin);
        wheel.insert(origin + ms(30), 'a');
        wheel.insert(origin + ms(10), 'b');
        wheel.insert(origin + ms(5000), 'e');
        wheel.insert(origin + ms(20), 'c');
        wheel.insert(origin + ms(10), 'd');
        assert_eq!(wheel.len(), 5);
        assert_eq!(wheel.next_deadline(), Some(origin + ms(10)));
        assert!(drain(&mut wheel, origin + ms(9)).is_empty());
        assert_eq!(drain(&mut wheel, origin + ms(25)), vec!['b', 'd', 'c']);
        assert_eq!(wheel.next_deadline(), Some(origin + ms(30)));
        assert_eq!(drain(&mut wheel, origin + ms(6000)), vec!['a', 'e']);
        assert!(wheel.is_empty());
        assert_eq!(wheel.next_deadline(), None);
    }

    #[test]
    fn deadlines_round_up_and_now_rounds_down() {
        let origin = Instant::now();
        let mut wheel = TimerWheel::new(origin);
        let deadline = origin + Duration::from_micros(1500);
        wheel.insert(deadline, 1);
        assert_eq!(wheel.next_deadline(), Some(origin + ms(2)));
        // Past the deadline but inside tick 1: not yet.
        assert!(drain(&mut wheel, origin + Duration::from_micros(1999)).is_empty());
        assert_eq!(drain(&mut wheel, origin + ms(2)), vec![1]);
    }

    #[test]
    fn cancel_returns_the_value_once() {
        let origin = Instant::now();
        let mut wheel = TimerWheel::new(origin);
        let a = wheel.insert(origin + ms(10), "a");
        let b = wheel.insert(origin + ms(100_000), "b");
        assert_eq!(wheel.cancel(a), Some("a"));
        assert_eq!(wheel.cancel(a), None);
        assert_eq!(wheel.len(), 1);
        // The only remaining timer is at a higher level; the earliest slot moved on.
        assert!(wheel.next_deadline().is_some_and(|at| at > origin + ms(10)));
        assert!(drain(&mut wheel, origin + ms(50_000)).is_empty());
        assert_eq!(wheel.cancel(b), Some("b"));
        assert_eq!(wheel.next_deadline(), None);
        assert!(drain(&mut wheel, origin + ms(200_000)).is_empty());
    }

    #[test]
    fn stale_keys_never_reach_a_reused_entry() {
        let origin = Instant::now();
        let mut wheel = TimerWheel::new(origin);
        let a = wheel.insert(origin + ms(10), 1);
        assert_eq!(wheel.cancel(a), Some(1));
        let b = wheel.insert(origin + ms(10), 2);
        assert_eq!(a.index, b.index, "the freed entry is reused");
        assert_eq!(wheel.cancel(a), None);
        assert_eq!(wheel.len(), 1);
        assert_eq!(drain(&mut wheel, origin + ms(10)), vec![2]);
        // Fired keys are stale too, also once their entry is reused.
        assert_eq!(wheel.cancel(b), None);
        let c = wheel.insert(origin + ms(20), 3);
        assert_eq!(wheel.cancel(b), None);
        assert_eq!(wheel.cancel(c), Some(3));
    }

    #[test]
    fn past_deadlines_fire_at_the_next_expire() {
        let origin = Instant::now() + ms(1000);
        let mut wheel = TimerWheel::new(origin);
        // Before the origin.
        wheel.insert(origin.checked_sub(ms(500)).unwrap(), 1);
        assert_eq!(wheel.next_deadline(), Some(origin));
        assert_eq!(drain(&mut wheel, origin), vec![1]);

        let now = origin + ms(100);
        assert!(drain(&mut wheel, now).is_empty());
        wheel.insert(origin + ms(50), 2);
        wheel.insert(now, 3);
        wheel.insert(origin + ms(101), 4);
        // Due at once: the deadline is not after the last `now`.
        assert!(wheel.next_deadline().is_some_and(|at| at <= now));
        // Even an earlier `now` fires what was already due, and nothing else.
        assert_eq!(drain(&mut wheel, origin + ms(10)), vec![2, 3]);
        assert_eq!(wheel.next_deadline(), Some(origin + ms(101)));
        assert_eq!(drain(&mut wheel, origin + ms(101)), vec![4]);
    }

    #[test]
    fn earlier_now_fires_nothing_new() {
        let origin = Instant::now();
        let mut wheel = TimerWheel::new(origin);
        wheel.insert(origin + ms(150), 1);
        assert!(drain(&mut wheel, origin + ms(100)).is_empty());
        wheel.insert(origin + ms(120), 2);
        assert!(drain(&mut wheel, origin + ms(20)).is_empty());
        assert_eq!(wheel.next_deadline(), Some(origin + ms(120)));
        assert_eq!(drain(&mut wheel, origin + ms(120)), vec![2]);
        assert!(drain(&mut wheel, origin + ms(110)).is_empty());
        assert_eq!(drain(&mut wheel, origin + ms(150)), vec![1]);
    }

    #[test]
    fn far_future_timers_cascade_to_their_exact_tick() {
        let origin = Instant::now();
        let three_days = 3 * 24 * 3600 * 1000 + 7;
        let mut wheel = TimerWheel::new(origin);
        wheel.insert(origin + ms(three_days), 1);
        wheel.insert(origin + ms(three_days + 1), 2);
        let (fired, wakeups) = drive(&mut wheel, origin, origin + ms(u64::from(u32::MAX)));
        assert_eq!(fired, vec![(1, three_days), (2, three_days + 1)]);
        // One wake-up per level on the way down, not one per millisecond.
        assert!(wakeups <= 2 * LEVELS, "{wakeups} wake-ups");

        // The same by jumping: nothing early, then exactly on the tick.
        let mut wheel = TimerWheel::new(origin);
        wheel.insert(origin + ms(three_days), 1);
        assert!(drain(&mut wheel, origin + ms(3600 * 1000)).is_empty());
        assert!(drain(&mut wheel, origin + ms(three_days - 1)).is_empty());
        assert_eq!(drain(&mut wheel, origin + ms(three_days)), vec![1]);
    }

    #[test]
    fn beyond_the_wheel_range_still_fires_exactly() {
        let origin = Instant::now();
        // ~3.5 turns of the top level, and one just past a turn from a non-zero start.
        let far = 3 * RANGE + RANGE / 2 + 12_345;
        let mut wheel = TimerWheel::new(origin);
        wheel.insert(origin + ms(far), 1);
        wheel.insert(origin + ms(RANGE + 3), 2);
        let (fired, wakeups) = drive(&mut wheel, origin, origin + ms(far + RANGE));
        assert_eq!(fired, vec![(2, RANGE + 3), (1, far)]);
        assert!(wakeups <= 16 * LEVELS, "{wakeups} wake-ups");

        let mut wheel = TimerWheel::new(origin);
        assert!(drain(&mut wheel, origin + ms(RANGE - 2)).is_empty());
        wheel.insert(origin + ms(RANGE - 2 + RANGE + 5), 3);
        assert!(drain(&mut wheel, origin + ms(RANGE - 2 + RANGE + 4)).is_empty());
        assert_eq!(drain(&mut wheel, origin + ms(RANGE - 2 + RANGE + 5)), vec![3]);
    }

    #[test]
    fn one_big_jump_fires_everything_in_order() {
        let origin = Instant::now();
        let mut wheel = TimerWheel::new(origin);
        let mut rng = fastrand::Rng::with_seed(7);
        let mut expected: Vec<(u64, u32)> = Vec::new();
        for id in 0..20_000 {
            let tick = rng.u64(0..10 * 3600 * 1000);
            wheel.insert(origin + ms(tick), id);
            expected.push((tick, id));
        }
        expected.sort_unstable();
        let fired = drain(&mut wheel, origin + ms(11 * 3600 * 1000));
        assert_eq!(fired, expected.iter().map(|&(_, id)| id).collect::<Vec<_>>());
        assert!(wheel.is_empty());
    }

    #[test]
    fn slab_entries_are_reused() {
        let origin = Instant::now();
        let mut wheel = TimerWheel::new(origin);
        for round in 0..10u64 {
            let keys: Vec<_> = (0..100).map(|i| wheel.insert(origin + ms(round * 1000 + i * 7), i)).collect();
            for key in &keys[..50] {
                assert!(wheel.cancel(*key).is_some());
            }
            assert_eq!(drain(&mut wheel, origin + ms(round * 1000 + 999)).len(), 50);
        }
        assert_eq!(wheel.entries.len(), 100);
    }

    #[test]
    fn list_for_places_by_highest_differing_digit() {
        assert_eq!(list_for(0, 1), 1);
        assert_eq!(list_for(0, 63), 63);
        assert_eq!(list_for(0, 64), SLOTS + 1);
        assert_eq!(list_for(63, 64), SLOTS + 1);
        assert_eq!(list_for(64, 127), 63);
        assert_eq!(list_for(0, 1 << 30), TOP * SLOTS + 1);
        // Out of range: parked in the top slot holding `elapsed`, one turn on.
        assert_eq!(list_for(0, RANGE * 5), TOP * SLOTS);
        assert_eq!(list_for(RANGE - 1, RANGE + 1), TOP * SLOTS);
        assert_eq!(list_for((3 << 30) + 9, RANGE + (2 << 30)), TOP * SLOTS + 2);
    }

    #[derive(Clone, Debug)]
    enum Op {
        /// Deadline = now + ms - 1000 (so some are past), plus sub-ms nanos.
        Insert { ms: u64, nanos: u32 },
        /// Cancels the key at this index into all keys handed out (modulo their number).
        Cancel(usize),
        /// now += ms, plus sub-ms nanos.
        Advance { ms: u64, nanos: u32 },
        /// `expire` at now minus this many ms: nothing new may fire.
        Rewind(u64),
        /// now = `next_deadline()`, as a driver would.
        ToNextDeadline,
    }

    /// Spans every level, including beyond the wheel's range (2^36 ms).
    fn span() -> impl Strategy<Value = u64> {
        prop_oneof![
            4 => 0..100u64,
            3 => 0..10_000u64,
            2 => 0..100_000_000u64,
            1 => 0..(RANGE * 3),
        ]
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (span(), 0..1_000_000u32).prop_map(|(ms, nanos)| Op::Insert { ms, nanos }),
            2 => any::<usize>().prop_map(Op::Cancel),
            3 => (span(), 0..1_000_000u32).prop_map(|(ms, nanos)| Op::Advance { ms, nanos }),
            1 => (0..5_000u64).prop_map(Op::Rewind),
            3 => Just(Op::ToNextDeadline),
        ]
    }

    /// A pending timer in the model.
    struct Model {
        deadline_ns: u128,
        tick: u64,
        /// Its place in the fired order: (tick, or the model clock if already due at insert).
        order: u64,
    }

    fn ceil_tick(ns: u128) -> u64 {
        ns.div_ceil(1_000_000) as u64
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        #[test]
        fn matches_a_model(ops in proptest::collection::vec(op(), 1..120)) {
            // Times are nanoseconds since `start`, 2 s before the origin, so that deadlines before
            // the origin are tested too.
            let start = Instant::now();
            let base: u128 = 2_000_000_000;
            let origin = start + Duration::from_secs(2);
            let at = |ns: u128| start + Duration::from_nanos(u64::try_from(ns).unwrap());
            let mut wheel = TimerWheel::new(origin);
            let mut now_ns = base;
            // The latest `now` given to expire, and its tick (the model clock).
            let mut latest_ns = base;
            let mut clock: u64 = 0;
            let mut pending: BTreeMap<u64, Model> = BTreeMap::new();
            let mut keys: Vec<(TimerKey, u64)> = Vec::new();
            let mut next_id = 0u64;
            let mut fired = Vec::new();

            for op in ops {
                let expire_at = match op {
                    Op::Insert { ms, nanos } => {
                        let deadline_ns = (now_ns + u128::from(ms) * 1_000_000 + u128::from(nanos)).saturating_sub(1_000_000_000);
                        let tick = ceil_tick(deadline_ns.saturating_sub(base));
                        let id = next_id;
                        next_id += 1;
                        keys.push((wheel.insert(at(deadline_ns), id), id));
                        pending.insert(id, Model { deadline_ns, tick, order: tick.max(clock) });
                        None
                    }
                    Op::Cancel(i) => {
                        if !keys.is_empty() {
                            let (key, id) = keys[i % keys.len()];
                            let expected = pending.remove(&id).map(|_| id);
                            prop_assert_eq!(wheel.cancel(key), expected);
                        }
                        None
                    }
                    Op::Advance { ms, nanos } => {
                        now_ns += u128::from(ms) * 1_000_000 + u128::from(nanos);
                        Some(now_ns)
                    }
                    Op::Rewind(ms) => Some(now_ns.saturating_sub(u128::from(ms) * 1_000_000)),
                    Op::ToNextDeadline => {
                        if let Some(next) = wheel.next_deadline() {
                            now_ns = now_ns.max(base + next.duration_since(origin).as_nanos());
                        }
                        Some(now_ns)
                    }
                };
                let previous = wheel.next_deadline();
                if let Some(t_ns) = expire_at {
                    fired.clear();
                    wheel.expire(at(t_ns), &mut fired);
                    latest_ns = latest_ns.max(t_ns);
                    clock = ((latest_ns - base) / 1_000_000) as u64;
                    let mut due: Vec<(u64, u64)> =
                        pending.iter().filter(|(_, m)| m.tick <= clock).map(|(&id, m)| (m.order, id)).collect();
                    due.sort_unstable();
                    let due: Vec<u64> = due.into_iter().map(|(_, id)| id).collect();
                    prop_assert_eq!(&fired, &due, "at tick {}", clock);
                    for id in &due {
                        let model = pending.remove(id).unwrap();
                        // Never early, judged by the latest `now` the wheel was given.
                        prop_assert!(model.deadline_ns <= latest_ns);
                    }
                    // An expire at the announced deadline makes progress: it fires something or
                    // the next deadline moves later.
                    if let (Some(before), Some(after)) = (previous, wheel.next_deadline()) {
                        if at(t_ns) >= before {
                            prop_assert!(!fired.is_empty() || after > before);
                        }
                    }
                }
                prop_assert_eq!(wheel.len(), pending.len());
                prop_assert_eq!(wheel.is_empty(), pending.is_empty());
                let next = wheel.next_deadline();
                prop_assert_eq!(next.is_some(), !pending.is_empty());
                if let Some(next) = next {
                    let min_tick = pending.values().map(|m| m.tick).min().unwrap();
                    // Never later than the earliest pending deadline's tick.
                    prop_assert!(next <= origin + ms(min_tick));
                    let last_now = at(latest_ns);
                    if min_tick <= clock {
                        // Something inserted already due: wake at once.
                        prop_assert!(next <= last_now);
                    } else {
                        // Otherwise strictly after the processed past.
                        prop_assert!(next > last_now);
                    }
                }
            }
        }
    }
}
