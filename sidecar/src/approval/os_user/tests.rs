use super::*;

const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\n\
                      broken line\n\
                      :x:5:5::/:/bin/false\n\
                      dev:x:1000:1000:Dev,,,:/home/dev:/bin/bash\n";
const GROUP: &str = "root:x:0:\nstaff:x:50:dev,alice\ndba:x:60:alice\ndev:x:1000:\nbad\n";

#[test]
fn uids_are_named_from_passwd_and_unknown_ones_are_not_guessed() {
    assert_eq!(name_in(PASSWD, 0).as_deref(), Some("root"));
    assert_eq!(name_in(PASSWD, 1000).as_deref(), Some("dev"));
    assert_eq!(name_in(PASSWD, 5), None);
    assert_eq!(name_in(PASSWD, 1001), None);
    assert_eq!(name_of(u32::MAX - 7), format!("uid {}", u32::MAX - 7));
}

#[test]
fn groups_are_the_primary_one_and_those_listing_the_user() {
    assert_eq!(groups_in(GROUP, "dev", Some(1000)), ["staff", "dev"]);
    assert_eq!(groups_in(GROUP, "alice", None), ["staff", "dba"]);
    assert!(groups_in(GROUP, "nobody", None).is_empty());
}
