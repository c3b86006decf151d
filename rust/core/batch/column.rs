//! One field (keys or values) of a batch, laid out as an Arrow large binary array, so that
//! the Python layer can export it to Arrow consumers without copying (`py::arrow`).
//!
//! Offsets are `i64` (Arrow's "large binary", format `"Z"`): a `Vec`'s length always fits,
//! so no batch, however large, can overflow them, and every batch exports the same type.

use std::ops::Range;

/// Entries that are each some bytes or null, in Arrow's layout: entry `i` is
/// `data[offsets[i]..offsets[i + 1]]`, present if bit `i` of `validity` is set (least
/// significant bit first) and null otherwise (a null entry has no bytes).
#[derive(Debug)]
pub struct BinaryColumn {
    /// `len() + 1` entries, from 0, never decreasing.
    offsets: Vec<i64>,
    data: Vec<u8>,
    /// One bit per entry, in bytes of 8 entries; unused bits of the last byte are 0.
    validity: Vec<u8>,
    nulls: usize,
}

impl Default for BinaryColumn {
    fn default() -> Self {
        Self::with_capacity(0, 0)
    }
}

impl BinaryColumn {
    /// An empty column with room for `entries` entries of `bytes` bytes in all.
    pub fn with_capacity(entries: usize, bytes: usize) -> Self {
        let mut offsets = Vec::with_capacity(entries + 1);
        offsets.push(0);
        BinaryColumn {
            offsets,
            data: Vec::with_capacity(bytes),
            validity: Vec::with_capacity(entries.div_ceil(8)),
            nulls: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.offsets.len() - 1
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends an entry: `None` is null.
    pub fn push(&mut self, entry: Option<&[u8]>) {
        let index = self.len();
        if index % 8 == 0 {
            self.validity.push(0);
        }
        // Without branches on the entry: keys are often null and present by turns.
        if let Some(last) = self.validity.last_mut() {
            *last |= u8::from(entry.is_some()) << (index % 8);
        }
        self.nulls += usize::from(entry.is_none());
        self.data.extend_from_slice(entry.unwrap_or_default());
        // A Vec's length is at most isize::MAX, so it fits in i64.
        self.offsets.push(self.data.len() as i64);
        debug_assert!(self.is_consistent());
    }

    /// The entry at `index`: `None` if it is null.
    ///
    /// # Panics
    /// If `index >= len()`.
    pub fn get(&self, index: usize) -> Option<&[u8]> {
        if !self.is_valid(index) {
            return None;
        }
        let (start, end) = (self.offsets[index] as usize, self.offsets[index + 1] as usize);
        Some(&self.data[start..end])
    }

    /// Whether the entry at `index` is present (not null).
    ///
    /// # Panics
    /// If `index >= len()`.
    pub fn is_valid(&self, index: usize) -> bool {
        assert!(index < self.len(), "entry {index} of {}", self.len());
        self.validity[index / 8] >> (index % 8) & 1 == 1
    }

    /// Null entries in all.
    pub fn null_count(&self) -> usize {
        self.nulls
    }

    /// Null entries among `entries`.
    ///
    /// # Panics
    /// If `entries` ends past `len()`.
    pub fn nulls_in(&self, entries: Range<usize>) -> usize {
        assert!(entries.end <= self.len(), "entries {entries:?} of {}", self.len());
        if self.nulls == 0 || entries.is_empty() {
            return 0;
        }
        if entries == (0..self.len()) {
            return self.nulls;
        }
        entries.len() - entries.filter(|&i| self.is_valid(i)).count()
    }

    /// `len() + 1` offsets into `data()`, Arrow's offsets buffer.
    pub fn offsets(&self) -> &[i64] {
        &self.offsets
    }

    /// The present entries' bytes, back to back: Arrow's data buffer.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// One bit per entry, set if present: Arrow's validity bitmap.
    pub fn validity(&self) -> &[u8] {
        &self.validity
    }

    /// Bytes of the entries (not counting offsets and bitmap).
    pub fn byte_len(&self) -> usize {
        self.data.len()
    }

    /// The entries at `positions`, in that order, copied into a new column.
    ///
    /// # Panics
    /// If a position is `>= len()`.
    pub fn gather(&self, positions: impl ExactSizeIterator<Item = usize> + Clone) -> Self {
        let bytes = positions.clone().map(|i| self.get(i).map_or(0, <[u8]>::len)).sum();
        let mut column = Self::with_capacity(positions.len(), bytes);
        for i in positions {
            column.push(self.get(i));
        }
        column
    }

    /// Hands out the filled column and leaves an empty one with as much room.
    pub fn take(&mut self) -> Self {
        let room = Self::with_capacity(self.offsets.capacity().saturating_sub(1), self.data.capacity());
        std::mem::replace(self, room)
    }

    pub fn clear(&mut self) {
        self.offsets.truncate(1);
        self.data.clear();
        self.validity.clear();
        self.nulls = 0;
    }

    /// What Arrow requires of the buffers (checked in debug builds after every push).
    fn is_consistent(&self) -> bool {
        let offsets_ok = self.offsets.first() == Some(&0)
            && self.offsets.windows(2).last().is_none_or(|w| w[0] <= w[1])
            && self.offsets.last().is_some_and(|&end| end as usize == self.data.len());
        let tail_bits_clear = self.len() % 8 == 0 || self.validity.last().is_some_and(|b| b >> (self.len() % 8) == 0);
        offsets_ok && self.validity.len() == self.len().div_ceil(8) && tail_bits_clear
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn column(entries: &[Option<&[u8]>]) -> BinaryColumn {
        let mut column = BinaryColumn::default();
        for &entry in entries {
            column.push(entry);
        }
        column
    }

    #[test]
    fn lays_entries_out_as_arrow_does() {
        let column = column(&[Some(b"ab"), None, Some(b""), Some(b"cde")]);
        assert_eq!(column.len(), 4);
        assert_eq!(column.offsets(), &[0, 2, 2, 2, 5]);
        assert_eq!(column.data(), b"abcde");
        assert_eq!(column.validity(), &[0b1101]);
        assert_eq!(column.null_count(), 1);
        let entries: Vec<_> = (0..4).map(|i| column.get(i)).collect();
        assert_eq!(entries, vec![Some(&b"ab"[..]), None, Some(&b""[..]), Some(&b"cde"[..])]);
    }

    #[test]
    fn the_bitmap_grows_a_byte_every_8_entries() {
        // Boundaries of the bitmap's bytes: 7, 8, 9, 16 and 17 entries, the last one null.
        for len in [1, 7, 8, 9, 16, 17] {
            let mut entries: Vec<Option<&[u8]>> = vec![Some(b"x"); len - 1];
            entries.push(None);
            let column = column(&entries);
            assert_eq!(column.validity().len(), len.div_ceil(8), "{len} entries");
            assert!(column.is_consistent());
            assert_eq!(column.get(len - 1), None);
            assert!((0..len - 1).all(|i| column.get(i) == Some(&b"x"[..])), "{len}: {:08b}", column.validity()[0]);
        }
    }

    #[test]
    fn counts_nulls_in_a_range() {
        let column = column(&[None, Some(b"a"), None, None, Some(b"b"), None, Some(b"c"), Some(b"d"), None, None]);
        assert_eq!(column.nulls_in(0..10), 6);
        assert_eq!(column.nulls_in(1..5), 2);
        assert_eq!(column.nulls_in(6..8), 0);
        assert_eq!(column.nulls_in(7..10), 2);
        assert_eq!(column.nulls_in(3..3), 0);
    }

    #[test]
    fn gather_copies_the_chosen_entries_in_order() {
        let column = column(&[Some(b"a"), None, Some(b"ccc"), Some(b"")]);
        let picked = column.gather([3, 0, 1, 2].into_iter());
        let entries: Vec<_> = (0..picked.len()).map(|i| picked.get(i)).collect();
        assert_eq!(entries, vec![Some(&b""[..]), Some(&b"a"[..]), None, Some(&b"ccc"[..])]);
        assert_eq!((picked.null_count(), picked.offsets()), (1, &[0, 0, 1, 1, 4][..]));
    }

    #[test]
    fn take_and_clear_leave_an_empty_column() {
        let mut filling = column(&[Some(b"abc"), None]);
        let taken = filling.take();
        assert_eq!((taken.len(), filling.len(), filling.offsets()), (2, 0, &[0][..]));
        assert!(filling.data.capacity() >= 3, "keeps its room");
        filling.push(None);
        filling.clear();
        assert!(filling.is_empty() && filling.is_consistent() && filling.null_count() == 0);
        filling.push(Some(b"z"));
        assert_eq!(filling.get(0), Some(&b"z"[..]));
    }
}
