//! A minimal `text/event-stream` decoder: just enough to pull each event's `data` out of the
//! gateway's job event stream (the JSON repeats the event name, so `event:` lines are skipped).

#[derive(Default)]
pub struct SseDecoder {
    buf: Vec<u8>,
    data: String,
}

impl SseDecoder {
    /// Feeds one chunk of the body; returns the `data` of every event it completed.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<String> {
        self.buf.extend_from_slice(chunk);
        let mut events = Vec::new();
        let mut start = 0;
        while let Some(len) = self.buf[start..].iter().position(|&b| b == b'\n') {
            let line = &self.buf[start..start + len];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            start += len + 1;
            if line.is_empty() {
                if !self.data.is_empty() {
                    events.push(std::mem::take(&mut self.data));
                }
            } else if let Some(value) = line.strip_prefix(b"data:") {
                let value = value.strip_prefix(b" ").unwrap_or(value);
                if !self.data.is_empty() {
                    self.data.push('\n');
                }
                self.data.push_str(&String::from_utf8_lossy(value));
            }
            // `event:`, `id:`, `retry:` and `:` keep-alive comments carry nothing we need.
        }
        self.buf.drain(..start);
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_events_across_chunks() {
        let mut sse = SseDecoder::default();
        assert!(sse.push(b"event: progress\ndata: {\"a\"").is_empty());
        assert_eq!(sse.push(b":1}\n\nevent: succ"), vec![r#"{"a":1}"#]);
        assert_eq!(sse.push(b"eeded\r\ndata:{}\r\n\r\n"), vec!["{}"]);
    }

    #[test]
    fn skips_comments_and_joins_data_lines() {
        let mut sse = SseDecoder::default();
        let events = sse.push(b": keep-alive\n\ndata: one\ndata: two\n\n");
        assert_eq!(events, vec!["one\ntwo"]);
    }
}
