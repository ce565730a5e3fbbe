//! Agent attributes: `rack:r1;zone:a;level:3` (text or scalar values).

use crate::pb::{self, attribute::Value};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("attributes: {0}")]
pub struct AttributeError(String);

/// Parses the `--attributes` text form. A value that parses as a finite
/// number is a scalar, anything else is text (as in Mesos).
pub fn parse(text: &str) -> Result<Vec<pb::Attribute>, AttributeError> {
    let mut out: Vec<pb::Attribute> = Vec::new();
    for part in text.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, value) = part
            .split_once(':')
            .ok_or_else(|| AttributeError(format!("'{part}' is not NAME:VALUE")))?;
        let (name, value) = (name.trim(), value.trim());
        if name.is_empty() || value.is_empty() {
            return Err(AttributeError(format!(
                "'{part}' has an empty name or value"
            )));
        }
        if out.iter().any(|a| a.name == name) {
            return Err(AttributeError(format!("'{name}' is given twice")));
        }
        let value = match value.parse::<f64>() {
            Ok(v) if v.is_finite() => Value::Scalar(v),
            _ => Value::Text(value.to_string()),
        };
        out.push(pb::Attribute {
            name: name.to_string(),
            value: Some(value),
        });
    }
    Ok(out)
}

/// The attribute's value as text (scalars formatted as numbers).
pub fn value_text(attr: &pb::Attribute) -> String {
    match &attr.value {
        Some(Value::Text(t)) => t.clone(),
        Some(Value::Scalar(s)) => s.to_string(),
        None => String::new(),
    }
}

/// Formats attributes back into the text form.
pub fn format(attrs: &[pb::Attribute]) -> String {
    attrs
        .iter()
        .map(|a| format!("{}:{}", a.name, value_text(a)))
        .collect::<Vec<_>>()
        .join(";")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_and_scalar_attributes_round_trip() {
        let attrs = parse("rack:r1; zone:a;level:3").unwrap();
        assert_eq!(attrs.len(), 3);
        assert_eq!(attrs[2].value, Some(Value::Scalar(3.0)));
        assert_eq!(format(&attrs), "rack:r1;zone:a;level:3");
    }

    #[test]
    fn malformed_attributes_are_rejected() {
        assert!(parse("rack").is_err());
        assert!(parse("rack:").is_err());
        assert!(parse("a:1;a:2").is_err());
    }
}
