//! A batch's keys or values as an Arrow array, through the Arrow `PyCapsule` protocol
//! (`__arrow_c_schema__`, `__arrow_c_array__`), so that pyarrow, polars or duckdb read a
//! batch with no copy and no Python object per message.
//!
//! The export is the C Data Interface's `ArrowSchema` and `ArrowArray`, written here (no
//! dependency on pyarrow). The array's buffers are the batch's own column
//! (`core::batch::BinaryColumn`, a large binary array), and Arrow's `offset`/`length` select
//! the call's slice of it. Each exported array holds the batch (an `Arc`) until its consumer
//! calls the array's `release`, which may happen on any thread, with or without the GIL; a
//! capsule dropped unconsumed calls `release` itself. Only a retry of some of a batch's
//! messages (after a `PartialFailure`) copies them, as they are not contiguous.

use std::ffi::{c_char, c_void, CStr};
use std::ops::Range;
use std::ptr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::types::PyCapsule;

use crate::core::batch::{Batch, BinaryColumn};

/// Arrow's format string of a binary array with i64 offsets ("large binary").
const LARGE_BINARY: &CStr = c"Z";
/// `ArrowSchema::flags`: the field may hold nulls.
const NULLABLE: i64 = 2;
/// The capsule names the `PyCapsule` protocol requires.
const SCHEMA_CAPSULE: &CStr = c"arrow_schema";
const ARRAY_CAPSULE: &CStr = c"arrow_array";

/// Exported arrays not released yet, for the tests: each holds its batch.
static LIVE_EXPORTS: AtomicUsize = AtomicUsize::new(0);

/// The C Data Interface's `struct ArrowSchema`.
#[repr(C)]
struct ArrowSchema {
    format: *const c_char,
    name: *const c_char,
    metadata: *const c_char,
    flags: i64,
    n_children: i64,
    children: *mut *mut ArrowSchema,
    dictionary: *mut ArrowSchema,
    /// Set while the schema is live; the consumer that moves it out clears it here.
    release: Option<unsafe extern "C" fn(*mut ArrowSchema)>,
    private_data: *mut c_void,
}

// SAFETY: its pointers lead only to static strings, and release may run on any thread.
unsafe impl Send for ArrowSchema {}

impl Drop for ArrowSchema {
    /// A schema still live when its capsule goes (nobody moved it out) is released here.
    fn drop(&mut self) {
        if let Some(release) = self.release {
            // SAFETY: a live schema of ours, released once (release clears itself).
            unsafe { release(self) };
        }
    }
}

/// The C Data Interface's `struct ArrowArray`.
#[repr(C)]
struct ArrowArray {
    length: i64,
    null_count: i64,
    offset: i64,
    n_buffers: i64,
    n_children: i64,
    buffers: *mut *const c_void,
    children: *mut *mut ArrowArray,
    dictionary: *mut ArrowArray,
    /// Set while the array is live; the consumer that moves it out clears it here.
    release: Option<unsafe extern "C" fn(*mut ArrowArray)>,
    /// A `Box<Kept>`.
    private_data: *mut c_void,
}

// SAFETY: its pointers lead into the `Kept` it owns, whose column is immutable and shared
// through an Arc (Send + Sync); the C Data Interface lets release run on any thread.
unsafe impl Send for ArrowArray {}

impl Drop for ArrowArray {
    /// An array still live when its capsule goes (nobody moved it out) is released here.
    fn drop(&mut self) {
        if let Some(release) = self.release {
            // SAFETY: a live array of ours, released once (release clears itself).
            unsafe { release(self) };
        }
    }
}

/// What an exported array keeps alive until released: the column its buffers lie in, and
/// the buffer pointers themselves (`ArrowArray::buffers` points here, not into the array
/// struct, which a consumer may move).
struct Kept {
    /// Never read: holding it is what keeps the buffers alive.
    #[allow(dead_code)]
    owner: ColumnOwner,
    buffers: [*const c_void; 3],
}

unsafe extern "C" fn release_schema(schema: *mut ArrowSchema) {
    // SAFETY: the consumer passes a live schema of ours, or one it moved out of ours.
    if let Some(schema) = unsafe { schema.as_mut() } {
        schema.release = None; // its strings are static: nothing to free
    }
}

unsafe extern "C" fn release_array(array: *mut ArrowArray) {
    // SAFETY: the consumer passes a live array of ours, or one it moved out of ours.
    let Some(array) = (unsafe { array.as_mut() }) else { return };
    if !array.private_data.is_null() {
        // SAFETY: `export` leaked this Box into private_data; it is taken back once, as
        // private_data is cleared below.
        drop(unsafe { Box::from_raw(array.private_data.cast::<Kept>()) });
        LIVE_EXPORTS.fetch_sub(1, Ordering::Relaxed);
    }
    array.private_data = ptr::null_mut();
    array.buffers = ptr::null_mut();
    array.release = None;
}

/// Which field of the messages a column holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    Keys,
    Values,
}

impl Field {
    /// The name of the exported Arrow field.
    fn name(self) -> &'static CStr {
        match self {
            Field::Keys => c"keys",
            Field::Values => c"values",
        }
    }

    fn of(self, batch: &Batch) -> &BinaryColumn {
        match self {
            Field::Keys => batch.keys(),
            Field::Values => batch.values(),
        }
    }
}

/// Who holds the bytes an export points into.
#[derive(Clone)]
enum ColumnOwner {
    /// The fetched batch itself: no copy.
    Batch(Arc<Batch>, Field),
    /// A copy of some of its entries (a retry of the messages that failed).
    Gathered(Arc<BinaryColumn>),
}

impl ColumnOwner {
    fn column(&self) -> &BinaryColumn {
        match self {
            ColumnOwner::Batch(batch, field) => field.of(batch),
            ColumnOwner::Gathered(column) => column,
        }
    }
}

/// The keys or values of a call's batch, for Arrow: `pyarrow.array(column)`,
/// `polars.Series(column)` and other readers of the Arrow `PyCapsule` protocol read it
/// without copying. A nullable large binary array (`pyarrow.large_binary()`), one entry
/// per message of the batch, in order (`len(column) == len(batch)`): the message's bytes,
/// or null for a null key or value. Immutable; each export holds the batch's memory until
/// the array read from it is dropped, however long after the call.
#[pyclass(frozen, module = "fastconsume._core", name = "ArrowColumn")]
pub struct PyArrowColumn {
    owner: ColumnOwner,
    field: Field,
    entries: Range<usize>,
}

impl PyArrowColumn {
    /// The entries of `field` at positions `entries` of `batch`, without copying.
    pub fn slice(batch: &Arc<Batch>, field: Field, entries: Range<usize>) -> Self {
        debug_assert!(entries.end <= batch.len());
        PyArrowColumn { owner: ColumnOwner::Batch(batch.clone(), field), field, entries }
    }

    /// The entries of `field` at `positions` of `batch`, copied.
    pub fn gather(batch: &Batch, field: Field, positions: &[u32]) -> Self {
        let column = field.of(batch).gather(positions.iter().map(|&p| p as usize));
        PyArrowColumn { owner: ColumnOwner::Gathered(Arc::new(column)), field, entries: 0..positions.len() }
    }

    fn schema(&self) -> ArrowSchema {
        ArrowSchema {
            format: LARGE_BINARY.as_ptr(),
            name: self.field.name().as_ptr(),
            metadata: ptr::null(),
            flags: NULLABLE,
            n_children: 0,
            children: ptr::null_mut(),
            dictionary: ptr::null_mut(),
            release: Some(release_schema),
            private_data: ptr::null_mut(),
        }
    }

    fn array(&self) -> ArrowArray {
        let column = self.owner.column();
        // Without nulls the bitmap may be left out, which spares consumers reading it.
        let validity = if column.null_count() == 0 { ptr::null() } else { column.validity().as_ptr().cast() };
        // Empty vectors give a dangling but non-null pointer, as some consumers want.
        let buffers = [validity, column.offsets().as_ptr().cast(), column.data().as_ptr().cast()];
        let kept = Box::into_raw(Box::new(Kept { owner: self.owner.clone(), buffers }));
        LIVE_EXPORTS.fetch_add(1, Ordering::Relaxed);
        ArrowArray {
            length: self.entries.len() as i64,
            null_count: column.nulls_in(self.entries.clone()) as i64,
            offset: self.entries.start as i64,
            n_buffers: 3,
            n_children: 0,
            // SAFETY: `kept` is the live allocation just made; no reference to it exists.
            buffers: unsafe { (&raw mut (*kept).buffers).cast() },
            children: ptr::null_mut(),
            dictionary: ptr::null_mut(),
            release: Some(release_array),
            private_data: kept.cast(),
        }
    }
}

#[pymethods]
impl PyArrowColumn {
    fn __len__(&self) -> usize {
        self.entries.len()
    }

    /// `"keys"` or `"values"`: the field's name in the export.
    #[getter]
    fn name(&self) -> &'static str {
        match self.field {
            Field::Keys => "keys",
            Field::Values => "values",
        }
    }

    /// The Arrow field (nullable large binary), as an `arrow_schema` capsule.
    fn __arrow_c_schema__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyCapsule>> {
        PyCapsule::new_with_value(py, self.schema(), SCHEMA_CAPSULE)
    }

    /// The field and the entries, as `arrow_schema` and `arrow_array` capsules. Each call
    /// exports anew, over the same memory.
    #[pyo3(signature = (requested_schema = None))]
    fn __arrow_c_array__<'py>(
        &self,
        py: Python<'py>,
        requested_schema: Option<Bound<'py, PyAny>>,
    ) -> PyResult<(Bound<'py, PyCapsule>, Bound<'py, PyCapsule>)> {
        // The protocol lets a producer ignore the request; the consumer checks the schema it
        // gets, and casts if it must (a copy fastconsume could not avoid either).
        let _ = requested_schema;
        let schema = PyCapsule::new_with_value(py, self.schema(), SCHEMA_CAPSULE)?;
        let array = PyCapsule::new_with_value(py, self.array(), ARRAY_CAPSULE)?;
        Ok((schema, array))
    }

    fn __repr__(&self) -> String {
        let nulls = self.owner.column().nulls_in(self.entries.clone());
        format!("ArrowColumn({}, {} entries, {nulls} null, large_binary)", self.name(), self.entries.len())
    }
}

/// Arrays exported and not released yet (a test hook: each one holds its batch).
#[pyfunction]
#[pyo3(name = "_live_arrow_exports")]
fn live_arrow_exports() -> usize {
    LIVE_EXPORTS.load(Ordering::Relaxed)
}

pub fn init_pymodule(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyArrowColumn>()?;
    m.add_function(wrap_pyfunction!(live_arrow_exports, m)?)
}
