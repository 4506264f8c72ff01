//! What `sticky` hashes (`--hash-key`, DESIGN §13): the client IP, or a key lb finds in the
//! request head by peeking ([`crate::peek`]) — the address a trusted proxy appended to
//! `X-Forwarded-For`/`Forwarded`, a cookie, a header, a query parameter. The first key present
//! wins; the client IP when none is.
//!
//! A key is hashed to the same 32-bit space as an IP ([`crate::balance::ip_key`]): an address
//! from `xff` hashes exactly as that address connecting directly would (so `lb route IP`
//! answers for it), any other key as its bytes ([`text_key`], what `lb route --key` computes).
//!
//! `xff` is believed only from `--proxy-trusted` sources: anyone else could pick their worker
//! by sending the header (and pile every client onto one).

use std::fmt;
use std::net::IpAddr;

use crate::balance::{canonical_ip, fmix32, ip_key};

/// One place a key may come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    /// The client's address (the connection's, or the PROXY header's).
    Ip,
    /// The last address in `X-Forwarded-For` (or the last `for=` of `Forwarded`), from a trusted
    /// proxy only.
    Xff,
    /// A cookie's value.
    Cookie(String),
    /// A request header's value.
    Header(String),
    /// A query parameter's value.
    Query(String),
}

/// `--hash-key`: the keys in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HashKeys(Vec<HashKey>);

impl Default for HashKeys {
    fn default() -> Self {
        Self(vec![HashKey::Ip])
    }
}

impl fmt::Display for HashKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<String> = self
            .0
            .iter()
            .map(|k| match k {
                HashKey::Ip => "ip".into(),
                HashKey::Xff => "xff".into(),
                HashKey::Cookie(n) => format!("cookie:{n}"),
                HashKey::Header(n) => format!("header:{n}"),
                HashKey::Query(n) => format!("query:{n}"),
            })
            .collect();
        f.write_str(&names.join(","))
    }
}

impl HashKeys {
    /// Parses `ip`, `xff`, `cookie:NAME`, `header:NAME`, `query:NAME`, comma-separated.
    pub fn parse(v: &str) -> Result<Self, String> {
        let token = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b))
        };
        let mut keys = Vec::new();
        for part in v.split(',').map(str::trim) {
            let key = match part.split_once(':') {
                None if part == "ip" => HashKey::Ip,
                None if part == "xff" => HashKey::Xff,
                Some(("cookie", n)) if token(n) => HashKey::Cookie(n.into()),
                Some(("header", n)) if token(n) => HashKey::Header(n.to_ascii_lowercase()),
                Some(("query", n)) if !n.is_empty() && !n.contains(['&', '=', '#', ' ']) => {
                    HashKey::Query(n.into())
                }
                _ => {
                    return Err(format!(
                        "unknown hash key `{part}` (expected ip, xff, cookie:NAME, header:NAME or query:NAME)"
                    ));
                }
            };
            keys.push(key);
            if keys.last() == Some(&HashKey::Ip) {
                // The IP is always there: keys after it would never be used.
                break;
            }
        }
        Ok(Self(keys))
    }

    /// Whether lb must peek for a key (anything before the first `ip`).
    pub fn peeks(&self) -> bool {
        self.0.first().is_some_and(|k| *k != HashKey::Ip)
    }

    /// Whether a key may be in the headers (so the whole head is needed, not only its line).
    pub fn needs_headers(&self) -> bool {
        self.0
            .iter()
            .any(|k| matches!(k, HashKey::Xff | HashKey::Cookie(_) | HashKey::Header(_)))
    }

    /// Whether `xff` is one of the keys.
    pub fn has_xff(&self) -> bool {
        self.0.contains(&HashKey::Xff)
    }

    /// The hash of the first key present in a request head (`target` is the request line's
    /// target, `headers` the header lines); `None` means the client IP. `xff_trusted`: the
    /// connection comes from a trusted proxy.
    pub fn find(&self, target: &[u8], headers: &[u8], xff_trusted: bool) -> Option<u32> {
        for k in &self.0 {
            let found = match k {
                HashKey::Ip => return None,
                HashKey::Xff if xff_trusted => forwarded_for(headers).map(ip_key),
                HashKey::Xff => None,
                HashKey::Cookie(name) => cookie(headers, name).map(text_key),
                HashKey::Header(name) => header(headers, name).map(text_key),
                HashKey::Query(name) => query(target, name).map(text_key),
            };
            if found.is_some() {
                return found;
            }
        }
        None
    }
}

/// The hash of a key's bytes: FNV-1a, then murmur3's finalizer (the same steps as an IP's
/// weight, so the rendezvous order is as even for keys as for addresses).
pub fn text_key(value: &[u8]) -> u32 {
    let mut h: u32 = 0x811C_9DC5;
    for &b in value {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    fmix32(h)
}

/// The values of header `name` (lower case), trimmed, in order.
fn headers_named<'a, 'n>(
    headers: &'a [u8],
    name: &'n str,
) -> impl Iterator<Item = &'a [u8]> + use<'a, 'n> {
    headers.split(|&b| b == b'\n').filter_map(move |line| {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let colon = line.iter().position(|&b| b == b':')?;
        line[..colon]
            .eq_ignore_ascii_case(name.as_bytes())
            .then(|| line[colon + 1..].trim_ascii())
    })
}

fn header<'a>(headers: &'a [u8], name: &str) -> Option<&'a [u8]> {
    headers_named(headers, name).find(|v| !v.is_empty())
}

fn cookie<'a>(headers: &'a [u8], name: &str) -> Option<&'a [u8]> {
    headers_named(headers, "cookie").find_map(|v| {
        v.split(|&b| b == b';').find_map(|pair| {
            let pair = pair.trim_ascii();
            let eq = pair.iter().position(|&b| b == b'=')?;
            let value = pair[eq + 1..].trim_ascii();
            let value = value
                .strip_prefix(b"\"")
                .and_then(|v| v.strip_suffix(b"\""))
                .unwrap_or(value);
            (&pair[..eq] == name.as_bytes() && !value.is_empty()).then_some(value)
        })
    })
}

fn query<'a>(target: &'a [u8], name: &str) -> Option<&'a [u8]> {
    let q = target.iter().position(|&b| b == b'?')?;
    let query = &target[q + 1..];
    let query = query.split(|&b| b == b'#').next().unwrap_or_default();
    query.split(|&b| b == b'&').find_map(|pair| {
        let eq = pair.iter().position(|&b| b == b'=')?;
        (&pair[..eq] == name.as_bytes() && eq + 1 < pair.len()).then(|| &pair[eq + 1..])
    })
}

/// The address the nearest proxy appended: the last element of the last `X-Forwarded-For`
/// header, else the last `for=` of the last `Forwarded` header (RFC 7239; quoted, bracketed
/// IPv6 and a port are understood). Anything that is not an address gives `None`.
fn forwarded_for(headers: &[u8]) -> Option<IpAddr> {
    let last = |name| {
        headers_named(headers, name)
            .filter(|v| !v.is_empty())
            .last()
    };
    let text = if let Some(xff) = last("x-forwarded-for") {
        xff.rsplit(|&b| b == b',').next()?.trim_ascii()
    } else {
        let fwd = last("forwarded")?;
        let element = fwd.rsplit(|&b| b == b',').next()?;
        element.split(|&b| b == b';').find_map(|p| {
            let p = p.trim_ascii();
            (p.len() > 4 && p[..4].eq_ignore_ascii_case(b"for=")).then(|| &p[4..])
        })?
    };
    address(text).map(canonical_ip)
}

/// An address, possibly quoted, bracketed (`[::1]`) or with a port (`1.2.3.4:5`).
fn address(text: &[u8]) -> Option<IpAddr> {
    let s = std::str::from_utf8(text).ok()?.trim_matches('"');
    if let Ok(ip) = s.parse() {
        return Some(ip);
    }
    if let Some(rest) = s.strip_prefix('[') {
        return rest.split(']').next()?.parse().ok();
    }
    let (host, port) = s.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    host.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(v: &str) -> HashKeys {
        HashKeys::parse(v).unwrap()
    }

    #[test]
    fn keys_parse_and_print_back() {
        assert_eq!(keys("ip"), HashKeys::default());
        assert!(!keys("ip").peeks());
        let k = keys("cookie:sid, header:X-User,query:room,xff,ip");
        assert_eq!(k.to_string(), "cookie:sid,header:x-user,query:room,xff,ip");
        assert!(k.peeks() && k.needs_headers() && k.has_xff());
        assert!(!keys("query:room").needs_headers());
        // Keys after `ip` can never be used.
        assert_eq!(keys("ip,cookie:a"), HashKeys::default());
        for bad in [
            "",
            "cookie:",
            "cookie",
            "mac",
            "header:a b",
            "query:a=b",
            "cookie:a;b",
        ] {
            assert!(HashKeys::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_first_key_present_wins_and_none_means_the_ip() {
        let k = keys("cookie:sid,header:x-user,query:room");
        let h = b"Host: a\r\nX-User:  bob \r\nCookie: a=1; sid=\"s3\"; b=2\r\n";
        assert_eq!(k.find(b"/?room=9", h, false), Some(text_key(b"s3")));
        let h = b"Host: a\r\nx-user: bob\r\n";
        assert_eq!(k.find(b"/?room=9", h, false), Some(text_key(b"bob")));
        assert_eq!(k.find(b"/x?a=1&room=9#f", b"", false), Some(text_key(b"9")));
        assert_eq!(k.find(b"/x?room=", b"Cookie: sid=\r\n", false), None);
        assert_ne!(text_key(b"a"), text_key(b"b"));
    }

    #[test]
    fn xff_is_the_nearest_proxys_entry_and_only_from_a_trusted_proxy() {
        let k = keys("xff");
        let ip = |s: &str| Some(ip_key(s.parse().unwrap()));
        let h = b"X-Forwarded-For: 6.6.6.6, 203.0.113.7\r\n";
        assert_eq!(k.find(b"/", h, true), ip("203.0.113.7"));
        assert_eq!(k.find(b"/", h, false), None, "untrusted source");
        let h = b"x-forwarded-for: 1.1.1.1\r\nX-Forwarded-For: 10.0.0.1, 2001:db8::1\r\n";
        assert_eq!(k.find(b"/", h, true), ip("2001:db8::1"));
        let h = b"Forwarded: for=1.1.1.1, for=\"[2001:db8::2]:4711\";proto=http\r\n";
        assert_eq!(k.find(b"/", h, true), ip("2001:db8::2"));
        let h = b"Forwarded: proto=https;For=192.0.2.60:8080\r\n";
        assert_eq!(k.find(b"/", h, true), ip("192.0.2.60"));
        assert_eq!(k.find(b"/", b"X-Forwarded-For: unknown\r\n", true), None);
        assert_eq!(
            k.find(b"/", b"X-Forwarded-For: ::ffff:10.1.2.3\r\n", true),
            ip("10.1.2.3"),
            "mapped addresses hash as IPv4"
        );
    }
}
