//! `inspect()`: the read-only report behind `fastconsume check`, as plain dicts and lists.

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use super::consumer::source_config;
use super::errors::to_pyerr;
use super::logs::{self, LOG_LINES_BEFORE_AN_ERROR};
use crate::kafka::inspect::Report;

/// Connects (each broker call bounded by `connect_timeout` seconds) and reports the brokers,
/// the group's state, members and assignment, and per topic its partitions' watermarks,
/// committed offsets, lag and owners. It never joins the group.
#[pyfunction]
#[pyo3(signature = (*, bootstrap, group, topics, kafka, connect_timeout))]
fn inspect(
    py: Python<'_>,
    bootstrap: String,
    group: String,
    topics: Vec<String>,
    kafka: Vec<(String, String)>,
    connect_timeout: f64,
) -> PyResult<Bound<'_, PyDict>> {
    let config = source_config(py, bootstrap, group, topics, kafka, connect_timeout, false)?;
    let report = py
        .detach(|| {
            let report = crate::kafka::inspect::inspect(&config);
            if report.is_err() {
                logs::flush(LOG_LINES_BEFORE_AN_ERROR); // the lines that led to it come first
            }
            report
        })
        .map_err(|e| to_pyerr(py, &e))?;
    to_dict(py, &report)
}

fn to_dict<'py>(py: Python<'py>, report: &Report) -> PyResult<Bound<'py, PyDict>> {
    let members = PyList::empty(py);
    for member in &report.members {
        let assignment = PyDict::new(py);
        for (topic, partitions) in &member.assignment {
            assignment.set_item(topic, partitions)?;
        }
        let m = PyDict::new(py);
        m.set_item("member_id", &member.member_id)?;
        m.set_item("client_id", &member.client_id)?;
        m.set_item("host", &member.host)?;
        m.set_item("assignment", assignment)?;
        members.append(m)?;
    }
    let topics = PyDict::new(py);
    for topic in &report.topics {
        let partitions = PyList::empty(py);
        for p in &topic.partitions {
            let d = PyDict::new(py);
            d.set_item("partition", p.partition)?;
            d.set_item("low", p.low)?;
            d.set_item("high", p.high)?;
            d.set_item("committed", p.committed)?;
            d.set_item("lag", p.lag)?;
            d.set_item("owner", &p.owner)?;
            partitions.append(d)?;
        }
        let t = PyDict::new(py);
        t.set_item("error", &topic.error)?;
        t.set_item("unknown", topic.unknown)?;
        t.set_item("partitions", partitions)?;
        topics.set_item(&topic.topic, t)?;
    }
    let dict = PyDict::new(py);
    dict.set_item("brokers", &report.brokers)?;
    dict.set_item("group", &report.group)?;
    dict.set_item("group_state", &report.group_state)?;
    dict.set_item("group_error", &report.group_error)?;
    dict.set_item("members", members)?;
    dict.set_item("topics", topics)?;
    Ok(dict)
}

pub fn init_pymodule(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(inspect, m)?)
}
