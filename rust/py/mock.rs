//! The mock cluster and a seeding producer, for the demo and for tests without a broker.

use pyo3::prelude::*;

use super::errors::to_pyerr;
use crate::kafka::mock::MockKafka;
use crate::kafka::seed::{self, Record};

/// librdkafka's in-process Kafka cluster. It lives until this object is collected.
#[pyclass(frozen, module = "fastconsume._core", name = "MockCluster")]
pub struct PyMockCluster {
    cluster: MockKafka,
}

#[pymethods]
impl PyMockCluster {
    #[new]
    #[pyo3(signature = (brokers = 1))]
    fn new(py: Python<'_>, brokers: i32) -> PyResult<Self> {
        let cluster = MockKafka::new(brokers).map_err(|e| to_pyerr(py, &e))?;
        Ok(PyMockCluster { cluster })
    }

    /// `host:port,...` for `App(bootstrap=...)`.
    #[getter]
    fn bootstrap(&self) -> String {
        self.cluster.bootstrap()
    }

    #[pyo3(signature = (topic, partitions = 1))]
    fn create_topic(&self, py: Python<'_>, topic: &str, partitions: i32) -> PyResult<()> {
        self.cluster.create_topic(topic, partitions).map_err(|e| to_pyerr(py, &e))
    }
}

/// Produces `values` (with `keys`, if given, pairwise) to `topic` and waits for every
/// acknowledgement. For seeding topics in tests, demos and benchmarks.
#[pyfunction]
#[pyo3(signature = (bootstrap, topic, values, *, keys = None, partition = None))]
fn produce(
    py: Python<'_>,
    bootstrap: &str,
    topic: &str,
    values: Vec<Vec<u8>>,
    keys: Option<Vec<Vec<u8>>>,
    partition: Option<i32>,
) -> PyResult<u64> {
    if let Some(keys) = &keys {
        if keys.len() != values.len() {
            return Err(pyo3::exceptions::PyValueError::new_err(format!(
                "got {} keys for {} values",
                keys.len(),
                values.len()
            )));
        }
    }
    let sent = py.detach(|| {
        let records = values.iter().enumerate().map(|(i, value)| Record {
            key: keys.as_ref().map(|k| k[i].as_slice()),
            value,
            partition,
        });
        seed::produce(bootstrap, topic, records)
    });
    sent.map_err(|e| to_pyerr(py, &e))
}

pub fn init_pymodule(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyMockCluster>()?;
    m.add_function(wrap_pyfunction!(produce, m)?)
}
