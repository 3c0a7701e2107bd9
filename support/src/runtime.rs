//! A Tokio runtime that its owner may drop anywhere.

/// A runtime shut down in the background, without waiting for its tasks, when dropped: its
/// owner may be dropped on a thread of another runtime (a store opened from an async
/// handler, a benchmark run cancelled by Ctrl-C), where dropping a runtime outright panics.
pub struct Background(Option<tokio::runtime::Runtime>);

impl Background {
    /// Takes `runtime` into the guard.
    pub fn new(runtime: tokio::runtime::Runtime) -> Background {
        Background(Some(runtime))
    }
}

impl std::ops::Deref for Background {
    type Target = tokio::runtime::Runtime;

    fn deref(&self) -> &tokio::runtime::Runtime {
        // Taken only by `drop`.
        self.0
            .as_ref()
            .unwrap_or_else(|| unreachable!("the runtime is taken only by drop"))
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Dropped inside another runtime's task, where a bare runtime's drop panics, the guard
    /// shuts its runtime down.
    #[test]
    fn a_guarded_runtime_may_be_dropped_inside_another() {
        let outer = tokio::runtime::Runtime::new().unwrap();
        let inner = Background::new(tokio::runtime::Runtime::new().unwrap());
        inner.spawn(std::future::pending::<()>());
        outer.block_on(async move { drop(inner) });
    }
}
