//! A hand-written waker: a publish task is polled first on the worker that
//! created it and handed to the async runtime only once something wakes it.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Wake, Waker};

use tokio::runtime::Handle;

use super::lock;

pub(super) type Task = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A task polled first on the calling thread and handed to the async runtime
/// only once something wakes it.
pub(super) struct Parked {
    runtime: Handle,
    state: Mutex<ParkedState>,
}

pub(super) struct ParkedState {
    /// The task, once its first poll left it waiting.
    task: Option<Task>,
    /// It was woken, possibly before it was stored here.
    woken: bool,
}

impl Parked {
    pub(super) fn start(runtime: &Handle, mut task: Task) {
        let parked = Arc::new(Self {
            runtime: runtime.clone(),
            state: Mutex::new(ParkedState {
                task: None,
                woken: false,
            }),
        });
        let waker = Waker::from(parked.clone());
        let _in_runtime = runtime.enter();
        if task
            .as_mut()
            .poll(&mut TaskContext::from_waker(&waker))
            .is_ready()
        {
            return;
        }
        let mut state = parked.lock();
        if state.woken {
            drop(state);
            runtime.spawn(task);
        } else {
            state.task = Some(task);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ParkedState> {
        // Nothing panics while holding it; a poisoned state is still whole.
        lock(&self.state)
    }
}

impl Wake for Parked {
    fn wake(self: Arc<Self>) {
        let task = {
            let mut state = self.lock();
            state.woken = true;
            state.task.take()
        };
        // Later wakes find the task gone: the runtime polls it from then on
        // with wakers of its own. If nothing ever wakes it (the channel went
        // away with the confirm), dropping the waker drops the task, and its
        // settle guard requeues the delivery.
        if let Some(task) = task {
            self.runtime.spawn(task);
        }
    }
}
