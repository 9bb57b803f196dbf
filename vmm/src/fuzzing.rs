//! Entry points for the fuzz targets (`fuzz/`): what a hostile file, client or guest hands the
//! VMM, from bytes. Only with the `fuzzing` feature; not part of the embedder's surface. Every
//! entry point must return without panicking whatever the bytes.

use std::io::Read;

use crate::api::{dispatch, http, model};
use crate::vm::VmState;

/// The bytes of an image's state file: framing, checksum, payload decoding, then the VMM's own
/// checks of the state and the devices restored from it, as `Image::load` and every fork run
/// them.
pub fn image_state(bytes: &[u8]) {
    let Ok((header, state)) = mu2_snapshot::decode_state::<VmState>(bytes, mu2_snapshot::Arch::host()) else {
        return;
    };
    if crate::image::validate(std::path::Path::new("fuzz"), &header, &state).is_ok() {
        let _ = crate::restore::devices_of(&state);
        let _ = state.ready_info();
    }
}

/// Bytes from a client, read the way a connection reads them (in reads whose sizes the input's
/// first byte sets, so a head can be split anywhere), each request through the API model.
pub fn http_request(bytes: &[u8]) {
    let Some((&chunk, rest)) = bytes.split_first() else { return };
    let mut stream = Chunked { data: rest, chunk: usize::from(chunk).max(1) };
    let mut buf = Vec::new();
    let limits = http::ReadLimits::new(1 << 16);
    while let Ok((request, _)) = http::read_request(&mut stream, &mut buf, &limits, &|| true) {
        let _ = request.header("content-type");
        let _ = model::parse(&request.method, &request.target, request.body);
        let _ = dispatch::Routes::new([("/a".to_string(), "x".to_string())]).find(&request.target);
    }
}

/// A guest's answer to the dispatcher, as `Handlers::dispatch` decodes it, and the same bytes
/// as the client parses a daemon's response.
pub fn dispatch_response(bytes: &[u8]) {
    let _ = dispatch::decode_response(bytes.to_vec(), 1 << 16);
    let limits = http::ResponseLimits { max_head: http::MAX_HEAD, max_headers: 8, max_body: 1 << 16 };
    let _ = http::parse_response(bytes, &limits, true);
}

/// A reader handing out its bytes at most `chunk` at a time.
struct Chunked<'a> {
    data: &'a [u8],
    chunk: usize,
}

impl Read for Chunked<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let n = self.chunk.min(out.len()).min(self.data.len());
        out[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}
