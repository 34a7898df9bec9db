//! Reading certificates as the mesh's checks need them: a PEM bundle's certificates
//! with their validity and names, and whether one signed another. Shared by the
//! controller (refusing an issuer set it could not use) and `remora check`.

use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// One certificate of a bundle.
#[derive(Debug, Clone)]
pub struct Cert {
    pub der: Vec<u8>,
    pub subject: String,
    pub issuer: String,
    /// Validity, in seconds since the Unix epoch.
    pub not_before: i64,
    pub not_after: i64,
    /// The DNS names of its subjectAltName.
    pub dns_names: Vec<String>,
    /// The raw SubjectPublicKeyInfo's key bits, to match a key pair against.
    pub public_key: Vec<u8>,
    /// basicConstraints CA:TRUE.
    pub is_ca: bool,
    /// keyUsage keyCertSign (or no keyUsage extension, which allows every use).
    pub signs_certificates: bool,
}

impl Cert {
    pub fn from_der(der: &[u8]) -> Result<Self, String> {
        let (_, x) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
        let dns_names = x
            .subject_alternative_name()
            .ok()
            .flatten()
            .map(|san| {
                san.value
                    .general_names
                    .iter()
                    .filter_map(|n| match n {
                        GeneralName::DNSName(d) => Some(d.to_string()),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let is_ca = x.is_ca();
        let signs_certificates = match x.key_usage() {
            Ok(Some(ku)) => ku.value.key_cert_sign(),
            Ok(None) => true,
            Err(_) => false,
        };
        Ok(Self {
            der: der.to_vec(),
            subject: x.subject().to_string(),
            issuer: x.issuer().to_string(),
            not_before: x.validity().not_before.timestamp(),
            not_after: x.validity().not_after.timestamp(),
            dns_names,
            public_key: x.public_key().raw.to_vec(),
            is_ca,
            signs_certificates,
        })
    }

    /// Why this certificate cannot sign others (a CA for the mesh), if it cannot:
    /// webpki refuses chains through a certificate without CA:TRUE and keyCertSign.
    pub fn not_a_ca(&self) -> Option<&'static str> {
        match (self.is_ca, self.signs_certificates) {
            (false, _) => Some("is not a CA (basicConstraints CA:TRUE is missing)"),
            (true, false) => Some("may not sign certificates (keyUsage lacks keyCertSign)"),
            (true, true) => None,
        }
    }

    /// Valid at `now` (seconds since the epoch).
    pub fn valid_at(&self, now: i64) -> bool {
        self.not_before <= now && now <= self.not_after
    }

    /// Whether `issuer` signed this certificate (names match and the signature
    /// verifies with its key), or this is `issuer` itself.
    pub fn signed_by(&self, issuer: &Cert) -> bool {
        if self.der == issuer.der {
            return true;
        }
        let (Ok((_, me)), Ok((_, them))) = (
            X509Certificate::from_der(&self.der),
            X509Certificate::from_der(&issuer.der),
        ) else {
            return false;
        };
        me.issuer() == them.subject() && me.verify_signature(Some(them.public_key())).is_ok()
    }

    /// Whether any certificate of `anchors` signed this one (or is it).
    pub fn chains_to(&self, anchors: &[Cert]) -> bool {
        anchors.iter().any(|a| self.signed_by(a))
    }
}

/// The certificates of a PEM bundle (other blocks are skipped); an error when there
/// is none or one cannot be read.
pub fn bundle(pem_text: &str) -> Result<Vec<Cert>, String> {
    let blocks = pem::parse_many(pem_text).map_err(|e| format!("not PEM: {e}"))?;
    let certs = blocks
        .iter()
        .filter(|p| p.tag() == "CERTIFICATE")
        .map(|p| Cert::from_der(p.contents()).map_err(|e| format!("a certificate: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    if certs.is_empty() {
        return Err("no PEM certificate".into());
    }
    Ok(certs)
}

/// Seconds since the Unix epoch, now.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A time (seconds since the epoch) as certificates print it.
pub fn date(secs: i64) -> String {
    x509_parser::time::ASN1Time::from_timestamp(secs)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| format!("{secs}s after the epoch"))
}
