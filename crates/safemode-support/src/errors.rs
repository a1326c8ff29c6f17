//! Rendering errors for people: transport and store errors keep the useful
//! part ("Connection refused") in their sources, so messages join the chain.

/// An error and its causes, joined with `: ` (see [`join_causes`]).
pub fn error_chain(error: &dyn std::error::Error) -> String {
    join_causes(error.to_string(), error.source())
}

/// `message` followed by each cause in the chain from `source`, skipping a
/// cause whose text is already in the message.
pub fn join_causes(mut message: String, source: Option<&dyn std::error::Error>) -> String {
    let mut source = source;
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}
