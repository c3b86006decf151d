//! `Batch` and `Message` as Python sees them. A fetched batch becomes Python objects once,
//! lazily, under the GIL: the values tuple on first `values()`, the messages tuple on first
//! iteration or indexing. Every plugin's `Batch` is a view on the same immutable objects.

use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyList, PyString, PyTuple};

use super::arrow::{Field, PyArrowColumn};
use crate::core::batch::Batch;
use crate::core::lane::Chunk;

/// A Kafka message. Immutable; shared by every plugin that sees it.
#[pyclass(frozen, module = "fastconsume._core", name = "Message")]
pub struct PyMessage {
    #[pyo3(get)]
    key: Option<Py<PyBytes>>,
    #[pyo3(get)]
    value: Option<Py<PyBytes>>,
    /// `(name, value)` pairs, in the order the producer wrote them.
    #[pyo3(get)]
    headers: Py<PyTuple>,
    #[pyo3(get)]
    topic: Py<PyString>,
    #[pyo3(get)]
    partition: i32,
    #[pyo3(get)]
    offset: i64,
    /// Milliseconds since the epoch, or `None` if the broker gave none.
    #[pyo3(get)]
    timestamp: Option<i64>,
}

#[pymethods]
impl PyMessage {
    fn __repr__(&self, py: Python<'_>) -> String {
        let size = self.value.as_ref().map_or(0, |v| v.bind(py).as_bytes().len());
        format!(
            "Message(topic={:?}, partition={}, offset={}, value=<{size} bytes>)",
            self.topic.bind(py).to_string_lossy(),
            self.partition,
            self.offset,
        )
    }
}

/// The Python objects of one fetched batch, built at most once and shared by its plugins.
struct BatchObjects {
    values: PyOnceLock<Py<PyTuple>>,
    messages: PyOnceLock<Py<PyTuple>>,
}

impl BatchObjects {
    fn new() -> Self {
        BatchObjects { values: PyOnceLock::new(), messages: PyOnceLock::new() }
    }
}

fn objects(batch: &Batch) -> PyResult<&BatchObjects> {
    batch
        .host(BatchObjects::new)
        .ok_or_else(|| pyo3::exceptions::PyRuntimeError::new_err("batch objects of another type"))
}

fn values<'a, 'py>(py: Python<'py>, batch: &'a Batch) -> PyResult<&'a Bound<'py, PyTuple>> {
    let values = objects(batch)?.values.get_or_try_init(py, || {
        let items = batch.iter().map(|m| m.value.map(|v| PyBytes::new(py, v)));
        PyTuple::new(py, items).map(Bound::unbind)
    })?;
    Ok(values.bind(py))
}

fn messages<'a, 'py>(py: Python<'py>, batch: &'a Batch) -> PyResult<&'a Bound<'py, PyTuple>> {
    let messages = objects(batch)?.messages.get_or_try_init(py, || {
        let values = values(py, batch)?;
        let topic = PyString::new(py, &batch.partition().topic).unbind();
        let partition = batch.partition().partition;
        let no_headers = PyTuple::empty(py).unbind();
        let mut items = Vec::with_capacity(batch.len());
        for (i, m) in batch.iter().enumerate() {
            let headers = if m.headers().len() == 0 {
                no_headers.clone_ref(py)
            } else {
                let pairs = m.headers().map(|(name, value)| {
                    (PyString::new(py, &String::from_utf8_lossy(name)), value.map(|v| PyBytes::new(py, v)))
                });
                PyTuple::new(py, pairs)?.unbind()
            };
            let message = PyMessage {
                key: m.key.map(|k| PyBytes::new(py, k).unbind()),
                value: values.get_item(i)?.extract()?,
                headers,
                topic: topic.clone_ref(py),
                partition,
                offset: m.offset,
                timestamp: m.timestamp,
            };
            items.push(Py::new(py, message)?);
        }
        PyTuple::new(py, items).map(Bound::unbind)
    })?;
    Ok(messages.bind(py))
}

/// Which messages of a fetched batch a call receives.
enum Selection {
    Range(Range<usize>),
    /// After a partial failure: the positions that failed, retried alone.
    Positions(Arc<[u32]>),
}

/// The messages one plugin call receives: a slice of one partition's fetched batch (or, on
/// a retry after a partial failure, the messages that failed), with the call's deadline.
#[pyclass(frozen, sequence, module = "fastconsume._core", name = "Batch")]
pub struct PyBatch {
    batch: Arc<Batch>,
    selection: Selection,
    /// The name of the plugin this batch was made for.
    #[pyo3(get)]
    plugin: Py<PyString>,
    /// 1 on the first call with these messages, 2 on the first retry, and so on.
    #[pyo3(get)]
    attempt: u32,
    deadline: Option<Instant>,
}

impl PyBatch {
    pub fn new(chunk: &Chunk, plugin: Py<PyString>, deadline: Option<Instant>) -> Self {
        let selection = match &chunk.subset {
            Some(positions) => Selection::Positions(positions.clone()),
            None => Selection::Range(chunk.range.clone()),
        };
        PyBatch { batch: chunk.batch.clone(), selection, plugin, attempt: chunk.attempt, deadline }
    }

    /// The position in the fetched batch of the call's `position`-th message.
    fn index(&self, position: usize) -> usize {
        match &self.selection {
            Selection::Range(range) => range.start + position,
            Selection::Positions(positions) => positions[position] as usize,
        }
    }

    /// Picks the call's items out of the fetched batch's tuple.
    fn select<'py>(&self, all: &Bound<'py, PyTuple>) -> PyResult<Bound<'py, PyTuple>> {
        match &self.selection {
            Selection::Range(range) => Ok(all.get_slice(range.start, range.end)),
            Selection::Positions(positions) => {
                let items = positions.iter().map(|&i| all.get_item(i as usize)).collect::<PyResult<Vec<_>>>()?;
                PyTuple::new(all.py(), items)
            }
        }
    }

    /// The call's entries of `field`, for Arrow.
    fn arrow_column(&self, field: Field) -> PyArrowColumn {
        match &self.selection {
            Selection::Range(range) => PyArrowColumn::slice(&self.batch, field, range.clone()),
            Selection::Positions(positions) => PyArrowColumn::gather(&self.batch, field, positions),
        }
    }

    /// Seconds until the deadline; negative once it has passed.
    fn seconds_left(&self) -> Option<f64> {
        let deadline = self.deadline?;
        let now = Instant::now();
        Some(if deadline >= now { (deadline - now).as_secs_f64() } else { -(now - deadline).as_secs_f64() })
    }
}

#[pymethods]
impl PyBatch {
    fn __len__(&self) -> usize {
        match &self.selection {
            Selection::Range(range) => range.len(),
            Selection::Positions(positions) => positions.len(),
        }
    }

    fn __iter__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let selected = self.select(messages(py, &self.batch)?)?;
        Ok(selected.as_any().try_iter()?.into_any())
    }

    fn __getitem__<'py>(&self, py: Python<'py>, index: isize) -> PyResult<Bound<'py, PyAny>> {
        let len = self.__len__() as isize;
        let position = if index < 0 { index + len } else { index };
        if !(0..len).contains(&position) {
            return Err(pyo3::exceptions::PyIndexError::new_err(format!(
                "batch index {index} out of range for {len} messages"
            )));
        }
        messages(py, &self.batch)?.get_item(self.index(position as usize))
    }

    /// The message values in order, without building `Message` objects.
    fn values<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        Ok(self.select(values(py, &self.batch)?)?.to_list())
    }

    /// The message values in order as an Arrow array (nullable large binary), without a
    /// Python object per message and without copying.
    fn arrow_values(&self) -> PyArrowColumn {
        self.arrow_column(Field::Values)
    }

    /// The message keys in order as an Arrow array, like `arrow_values()`.
    fn arrow_keys(&self) -> PyArrowColumn {
        self.arrow_column(Field::Keys)
    }

    /// The topic every message of the batch comes from.
    #[getter]
    fn topic(&self) -> &str {
        &self.batch.partition().topic
    }

    /// The partition every message of the batch comes from.
    #[getter]
    fn partition(&self) -> i32 {
        self.batch.partition().partition
    }

    /// When this call should be done, on `time.monotonic()`'s clock; `None` without a
    /// `timeout`.
    #[getter]
    fn deadline(&self, py: Python<'_>) -> PyResult<Option<f64>> {
        let Some(left) = self.seconds_left() else { return Ok(None) };
        let now: f64 = py.import("time")?.getattr("monotonic")?.call0()?.extract()?;
        Ok(Some(now + left))
    }

    /// Seconds left until the deadline (0.0 once passed); `None` without a `timeout`.
    fn remaining(&self) -> Option<f64> {
        self.seconds_left().map(|left| left.max(0.0))
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        let len = self.__len__();
        let (first, last) = (self.batch.get(self.index(0)).offset, self.batch.get(self.index(len - 1)).offset);
        format!(
            "Batch(plugin={:?}, topic={:?}, partition={}, offsets={first}..={last}, messages={len}, attempt={})",
            self.plugin.bind(py).to_string_lossy(),
            self.topic(),
            self.partition(),
            self.attempt
        )
    }
}

pub fn init_pymodule(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyMessage>()?;
    m.add_class::<PyBatch>()
}
