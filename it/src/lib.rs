//! This package only holds integration tests (`it/tests`): the extension driven through SQL on real clusters.
