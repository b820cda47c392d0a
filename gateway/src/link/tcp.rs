//! Raw TCP links to serial device servers (ser2net, Moxa NPort in TCP server
//! mode): the byte stream is the device's UART. Line settings live on the
//! server, so `configure` and `set_lines` are unsupported here (RFC 2217 is not
//! spoken).

use tokio::net::TcpStream;

use super::Transport;

/// Connect to a serial device server.
pub async fn connect(host: &str, port: u16) -> std::io::Result<TcpStream> {
    let stream = TcpStream::connect((host, port)).await?;
    // Bootloader protocols are request/response with small frames.
    stream.set_nodelay(true)?;
    Ok(stream)
}

impl Transport for TcpStream {
    fn configure(&mut self, _config: &super::SerialConfig) -> Result<(), String> {
        Err("line settings of a TCP link are set on the device server".into())
    }
    fn set_lines(&mut self, _dtr: bool, _rts: bool) -> Result<(), String> {
        Err("a raw TCP link has no modem lines".into())
    }
}
