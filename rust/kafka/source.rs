//! `Source`: connects (bounded), subscribes, and runs the poll loop on its own thread.

use std::sync::Arc;
use std::thread::JoinHandle;

use rdkafka::consumer::Consumer;

use crate::core::errors::{Error, Result};
use crate::core::limit::Limiter;
use crate::kafka::config::SourceConfig;
use crate::kafka::connect::connect_and_find_topics;
use crate::kafka::consumer::{lock, KafkaConsumer, SourceContext};
use crate::kafka::errors::to_error;
use crate::kafka::fetch::FetchQueue;
use crate::kafka::intake::Intake;
use crate::kafka::poll::{PollLoop, Shape, Waker};

/// A running poll thread.
pub struct Source {
    pub consumer: Arc<KafkaConsumer>,
    thread: JoinHandle<()>,
}

impl Source {
    /// Connects (bounded by `connect_timeout`), subscribes and starts the poll thread.
    pub fn start(config: &SourceConfig, mut shape: Shape, intake: Arc<dyn Intake>) -> Result<Source> {
        config.validate()?;
        let drain = shape.idle_timeout.is_some();
        let context = SourceContext::new(intake.clone(), shape.revoke_timeout, drain);
        let mut client_config = config.client_config();
        let fetch_plan = config.fetch_plan(shape.linger);
        for (name, value) in &fetch_plan.properties {
            client_config.set(*name, value);
        }
        shape.fetch_gathering = fetch_plan.gathering;
        if drain {
            // The end of each partition is reported, so a partition whose first fetch is
            // slow is not taken for drained.
            client_config.set("enable.partition.eof", "true");
        }
        let mut consumer: KafkaConsumer =
            client_config.create_with_context(context).map_err(|e| to_error("create consumer", e))?;
        let limiter = shape.rate_limit.map(Limiter::new).transpose()?;
        // A stop while connecting (or waiting for topics) still starts the loop, which then
        // ends at once: the run returns as stopped, having consumed nothing.
        let stop = || intake.stop_requested();
        connect_and_find_topics(&consumer, &consumer.context().errors, config, &stop)?;
        let topics: Vec<&str> = config.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics).map_err(|e| to_error("subscribe", e))?;

        let new_queue =
            || FetchQueue::new(&consumer).ok_or_else(|| Error::Internal("librdkafka could not create a queue".into()));
        let fetch = Arc::new(new_queue()?);
        // Nothing is forwarded here: the loop sleeps on it while it may take nothing.
        let held_back = Arc::new(new_queue()?);
        *lock(&consumer.context().fetch) = Some(fetch.clone());
        let waker = Arc::new(Waker::default());
        *lock(&waker.queues) = vec![fetch.clone(), held_back.clone()];
        // Events (rebalances, errors, commit results) arrive on the consumer queue, which the
        // loop does not sleep on: its non-empty callback wakes the loop instead.
        let on_event = waker.clone();
        consumer.set_nonempty_callback(move || on_event.wake());
        let on_timer = waker.clone();
        intake.set_waker(Some(Arc::new(move || on_timer.wake())));
        let consumer = Arc::new(consumer);
        let (intake_on_error, waker_on_error) = (intake.clone(), waker.clone());
        let poll = PollLoop::new(consumer.clone(), fetch, held_back, waker, intake, shape, limiter);
        let spawned = std::thread::Builder::new().name("fastconsume-source".into()).spawn(move || poll.run());
        match spawned {
            Ok(thread) => Ok(Source { consumer, thread }),
            Err(e) => {
                // The queues must go before the consumer.
                intake_on_error.set_waker(None);
                lock(&waker_on_error.queues).clear();
                lock(&consumer.context().fetch).take();
                Err(Error::Internal(format!("cannot start the source thread: {e}")))
            }
        }
    }

    /// Waits for the poll thread to end (it ends on stop, idle or failure).
    pub fn join(self) -> Arc<KafkaConsumer> {
        if self.thread.join().is_err() {
            log::error!("the source thread panicked");
        }
        self.consumer
    }
}
