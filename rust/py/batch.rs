//! `Batch` and `Message` as Python sees them. A fetched batch becomes Python objects once,
//! lazily, under the GIL: the values tuple on first `values()`, the messages tuple on first
//! iteration or indexing. Every plugin's `Batch` is a view on the same immutable objects.

use std::ops::Range;
use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyList, PyString, PyTuple};

use crate::batch::Batch;

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

/// The messages one plugin call receives: a slice of one partition's fetched batch.
#[pyclass(frozen, sequence, module = "fastconsume._core", name = "Batch")]
pub struct PyBatch {
    batch: Arc<Batch>,
    start: usize,
    end: usize,
    /// The name of the plugin this batch was made for.
    #[pyo3(get)]
    plugin: Py<PyString>,
}

impl PyBatch {
    pub fn new(batch: Arc<Batch>, range: Range<usize>, plugin: Py<PyString>) -> Self {
        debug_assert!(range.end <= batch.len());
        PyBatch { batch, start: range.start, end: range.end, plugin }
    }
}

#[pymethods]
impl PyBatch {
    fn __len__(&self) -> usize {
        self.end - self.start
    }

    fn __iter__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let slice = messages(py, &self.batch)?.get_slice(self.start, self.end);
        Ok(slice.as_any().try_iter()?.into_any())
    }

    fn __getitem__<'py>(&self, py: Python<'py>, index: isize) -> PyResult<Bound<'py, PyAny>> {
        let len = self.__len__() as isize;
        let position = if index < 0 { index + len } else { index };
        if !(0..len).contains(&position) {
            return Err(pyo3::exceptions::PyIndexError::new_err(format!(
                "batch index {index} out of range for {len} messages"
            )));
        }
        messages(py, &self.batch)?.get_item(self.start + position as usize)
    }

    /// The message values in order, without building `Message` objects.
    fn values<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        Ok(values(py, &self.batch)?.get_slice(self.start, self.end).to_list())
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

    fn __repr__(&self, py: Python<'_>) -> String {
        let (first, last) = (self.batch.get(self.start).offset, self.batch.get(self.end - 1).offset);
        format!(
            "Batch(plugin={:?}, topic={:?}, partition={}, offsets={first}..={last}, messages={})",
            self.plugin.bind(py).to_string_lossy(),
            self.topic(),
            self.partition(),
            self.__len__()
        )
    }
}

pub fn init_pymodule(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyMessage>()?;
    m.add_class::<PyBatch>()
}
